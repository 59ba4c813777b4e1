# Installation, included by the top-level CMakeLists.txt once every library target exists:
#   the libraries, include/bnorm/, the CMake package bnorm (cmake/bnormConfig.cmake.in: the core,
#   and the components nn, io and mpi, each installed only when it was built), pkg-config's
#   bnorm.pc, and the Debian packages of `cpack -G DEB`:
#     libbnorm0     runtime: libbnorm.so.0 (what C programs and Python's ctypes load)
#     libbnorm-dev  headers, libbnorm.so, the static libraries, the CMake and pkg-config files
#     bnorm         the bnorm CLI (component tools: every install rule that names no component)
#     python3-bnorm the Python package (component python, python/CMakeLists.txt)
# Nothing installed or exported points into src/: the installed headers are include/bnorm/ only.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)
set(BNORM_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/bnorm)

# The core: headers of the batch-norm API, libbnorm.so (runtime; its namelink is dev) and
# libbnorm.a.
install(TARGETS bnorm bnorm_static EXPORT bnormTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT dev
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/bnorm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  COMPONENT dev FILES_MATCHING PATTERN "*.h" PATTERN "nn" EXCLUDE PATTERN "io" EXCLUDE)
install(EXPORT bnormTargets NAMESPACE bnorm:: DESTINATION ${BNORM_INSTALL_CMAKEDIR} COMPONENT dev)

# The components, with their headers, when their libraries were built. io's headers include
# nn's (state dicts), so io goes with nn.
set(BNORM_INSTALL_NN FALSE)
set(BNORM_INSTALL_IO FALSE)
set(BNORM_INSTALL_MPI FALSE)
if(TARGET bnorm_nn)
  set(BNORM_INSTALL_NN TRUE)
  if(TARGET bnorm_io)
    set(BNORM_INSTALL_IO TRUE)
  endif()
endif()
# Without MPI, bnorm_mpi is the stand-in whose mpi_world() fails: the package does not offer it.
if(BNORM_MPI_FOUND)
  set(BNORM_INSTALL_MPI TRUE)
endif()
foreach(comp nn io mpi)
  string(TOUPPER ${comp} COMP)
  if(NOT BNORM_INSTALL_${COMP})
    continue()
  endif()
  install(TARGETS bnorm_${comp} EXPORT bnorm_${comp}Targets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev)
  install(EXPORT bnorm_${comp}Targets NAMESPACE bnorm:: DESTINATION ${BNORM_INSTALL_CMAKEDIR}
    COMPONENT dev)
  if(EXISTS ${PROJECT_SOURCE_DIR}/include/bnorm/${comp})
    install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/bnorm/${comp}
      DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/bnorm COMPONENT dev FILES_MATCHING PATTERN "*.h")
  endif()
endforeach()

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/bnormConfig.cmake.in
  ${CMAKE_BINARY_DIR}/bnormConfig.cmake INSTALL_DESTINATION ${BNORM_INSTALL_CMAKEDIR}
  NO_SET_AND_CHECK_MACRO)
write_basic_package_version_file(${CMAKE_BINARY_DIR}/bnormConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_BINARY_DIR}/bnormConfig.cmake ${CMAKE_BINARY_DIR}/bnormConfigVersion.cmake
  DESTINATION ${BNORM_INSTALL_CMAKEDIR} COMPONENT dev)

# pkg-config (the C API): bnorm.pc, written at install time for the prefix installed into
# (cmake --install --prefix P, or /usr in the Debian package).
#   cc app.c $(pkg-config --cflags --libs bnorm)                          libbnorm.so
#   cc app.c $(pkg-config --cflags bnorm) -Wl,-Bstatic -lbnorm -Wl,-Bdynamic \
#      $(pkg-config --static --libs bnorm)                                  libbnorm.a
set(BNORM_PC_PREFIX "@BNORM_PC_PREFIX@")
configure_file(${PROJECT_SOURCE_DIR}/cmake/bnorm.pc.in ${CMAKE_BINARY_DIR}/pkgconfig/bnorm.pc.in
  @ONLY)
install(CODE "
  set(BNORM_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${CMAKE_BINARY_DIR}/pkgconfig/bnorm.pc.in\"
    \"${CMAKE_BINARY_DIR}/pkgconfig/bnorm.pc\" @ONLY)" COMPONENT dev)
install(FILES ${CMAKE_BINARY_DIR}/pkgconfig/bnorm.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT dev)

# Installing never builds: `cmake --install` does not, and with this neither do the install
# target nor cpack (whose preinstall step would otherwise rebuild the whole tree, under the
# tests/install test that packages this build). Build first, then install or package.
set(CMAKE_SKIP_INSTALL_ALL_DEPENDENCY ON)

# Debian packages: cpack -G DEB in the build directory, once it is built. Runtime and dev are split as Debian
# does (a program linked against libbnorm.so needs libbnorm0 only, not the headers and static
# libraries), and the CLI, which pulls OpenBLAS and MPI, has a package of its own.
set(CPACK_PACKAGE_NAME bnorm)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
# Each package's description is CPACK_DEBIAN_<COMPONENT>_DESCRIPTION, its first line the synopsis
# (CPACK_PACKAGE_DESCRIPTION_SUMMARY is left unset: CPack would put it before every one of them).
set(CPACK_PACKAGE_CONTACT "bnorm developers <bnorm@localhost>")
set(CPACK_GENERATOR DEB)
set(CPACK_COMPONENTS_ALL runtime dev)
if(TARGET bnorm_cli)
  list(APPEND CPACK_COMPONENTS_ALL tools)
endif()
# python/ installs the Python package bnorm as component python: python3-bnorm.
if(EXISTS ${PROJECT_SOURCE_DIR}/python/CMakeLists.txt)
  list(APPEND CPACK_COMPONENTS_ALL python)
endif()
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)  # dpkg-shlibdeps (dpkg-dev) names the libraries' packages
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME libbnorm${PROJECT_VERSION_MAJOR})
set(CPACK_DEBIAN_RUNTIME_PACKAGE_SECTION libs)
string(CONCAT CPACK_DEBIAN_RUNTIME_DESCRIPTION
  "Batch normalization with PyTorch's semantics: shared library\n"
  "libbnorm.so: the fp32 forward (training and eval) and backward passes of batch norm for every\n"
  "shape and layout, with Highway SIMD kernels, and its C API.")
set(CPACK_DEBIAN_DEV_PACKAGE_NAME libbnorm-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
# The static libraries link libhwy (and the components OpenBLAS, zlib, MPI) by name.
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS
  "libbnorm${PROJECT_VERSION_MAJOR} (= ${PROJECT_VERSION}), libhwy-dev")
set(CPACK_DEBIAN_DEV_PACKAGE_RECOMMENDS "pkg-config, libopenblas-dev, zlib1g-dev")
set(CPACK_DEBIAN_DEV_PACKAGE_SUGGESTS "libopenmpi-dev")
string(CONCAT CPACK_DEBIAN_DEV_DESCRIPTION
  "Batch normalization with PyTorch's semantics: development files\n"
  "Headers, libbnorm.so and the static libraries (bnorm, bnorm_nn, bnorm_io, bnorm_mpi), the CMake\n"
  "package (find_package(bnorm COMPONENTS nn io mpi)) and pkg-config's bnorm.pc.")
set(CPACK_DEBIAN_TOOLS_PACKAGE_NAME bnorm)
set(CPACK_DEBIAN_TOOLS_PACKAGE_SECTION science)
set(CPACK_DEBIAN_TOOLS_PACKAGE_RECOMMENDS "python3-matplotlib, dataset-fashion-mnist")
string(CONCAT CPACK_DEBIAN_TOOLS_DESCRIPTION
  "Batch normalization with PyTorch's semantics: the bnorm command\n"
  "bnorm train and bnorm eval: networks with and without batch norm on Fashion-MNIST.")
set(CPACK_DEBIAN_PYTHON_PACKAGE_NAME python3-bnorm)
set(CPACK_DEBIAN_PYTHON_PACKAGE_SECTION python)
set(CPACK_DEBIAN_PYTHON_PACKAGE_ARCHITECTURE all)
set(CPACK_DEBIAN_PYTHON_PACKAGE_DEPENDS
  "libbnorm${PROJECT_VERSION_MAJOR} (= ${PROJECT_VERSION}), python3, python3-numpy")
set(CPACK_DEBIAN_PYTHON_PACKAGE_SUGGESTS "python3-torch")
string(CONCAT CPACK_DEBIAN_PYTHON_DESCRIPTION
  "Batch normalization with PyTorch's semantics: Python package\n"
  "The Python package bnorm: numpy and torch layers on libbnorm.so (bnorm.numpy, bnorm.torch).")
include(CPack)
