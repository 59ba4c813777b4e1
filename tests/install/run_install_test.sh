#!/usr/bin/env bash
# The install-consumer test (tests/install/CMakeLists.txt registers it):
#   run_install_test.sh BUILD_DIR SOURCE_DIR CC CXX CMAKE CPACK MPI_BUILT(ON|OFF) NN_BUILT(ON|OFF)
# Installs BUILD_DIR into a temporary prefix and builds and runs consumers from there only.
set -euo pipefail
if [ $# -ne 8 ]; then
  echo "usage: run_install_test.sh BUILD SOURCE CC CXX CMAKE CPACK MPI_BUILT NN_BUILT" >&2
  exit 2
fi
build=$1 src=$2 cc=$3 cxx=$4 cmake=$5 cpack=$6 mpi_built=$7 nn_built=$8
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bnorm-install-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
fail() { echo "run_install_test: FAIL: $*" >&2; exit 1; }
step() { echo "== [${SECONDS}s] $*"; }
# Consumers see the prefix only: no package registry, no environment pointing elsewhere.
unset CMAKE_PREFIX_PATH PKG_CONFIG_PATH bnorm_DIR || true
consumer() {  # name, source dir, extra cmake args...
  local name=$1 dir=$2; shift 2
  "$cmake" -S "$dir" -B "$tmp/$name" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" \
    "$@" >"$tmp/$name.configure.log" 2>&1 || { cat "$tmp/$name.configure.log"; fail "$name: configure"; }
  grep -q "^bnorm_DIR:PATH=$prefix/" "$tmp/$name/CMakeCache.txt" || fail "$name: bnorm not found in $prefix"
  "$cmake" --build "$tmp/$name" -j 2 >"$tmp/$name.build.log" 2>&1 || { cat "$tmp/$name.build.log"; fail "$name: build"; }
}

step "cmake --install $build --prefix <tmp>"
"$cmake" --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; fail "install"; }
static_lib=$(find "$prefix" -name libbnorm.a)
[ -n "$static_lib" ] || fail "no libbnorm.a installed"
libdir=$(dirname "$static_lib")
cmakedir=$libdir/cmake/bnorm
for f in libbnorm.so libbnorm.a cmake/bnorm/bnormConfig.cmake cmake/bnorm/bnormConfigVersion.cmake \
         cmake/bnorm/bnormTargets.cmake pkgconfig/bnorm.pc; do
  [ -e "$libdir/$f" ] || fail "not installed: $f"
done
expected_components=""
[ "$nn_built" = ON ] && expected_components+=" nn io"
[ "$mpi_built" = ON ] && expected_components+=" mpi"
for comp in $expected_components; do
  [ -e "$libdir/libbnorm_$comp.a" ] || fail "not installed: libbnorm_$comp.a"
  [ -e "$cmakedir/bnorm_${comp}Targets.cmake" ] || fail "not installed: bnorm_${comp}Targets.cmake"
done
[ "$nn_built" = ON ] && { [ -e "$prefix/include/bnorm/io/safetensors.h" ] || fail "io headers not installed"; }
[ "$nn_built" = OFF ] && { [ ! -e "$prefix/include/bnorm/nn" ] || fail "nn headers installed without bnorm_nn"; }

step "exported targets: include directories within the prefix, no path into the source or build tree"
dirs=$(grep -ho 'INTERFACE_INCLUDE_DIRECTORIES "[^"]*"' "$cmakedir"/*Targets.cmake | sort -u)
echo "$dirs"
[ -n "$dirs" ] || fail "no INTERFACE_INCLUDE_DIRECTORIES exported"
[ "$dirs" = 'INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/include"' ] || fail "an exported target has other include directories"
if grep -rlF -e "$src" -e "$build" "$cmakedir" "$libdir/pkgconfig"; then
  fail "the installed package names the source or build tree"
fi
if find "$prefix/include" -type f ! -path "$prefix/include/bnorm/*" | grep .; then
  fail "headers installed outside include/bnorm/"
fi

step "every installed header compiles on its own (C++20; c_api.h also as C99)"
while IFS= read -r h; do
  echo "#include <$h>" | "$cxx" -std=c++20 -fsyntax-only -Wall -Wextra -Wpedantic -Werror \
    -I"$prefix/include" -x c++ - || fail "<$h> does not compile on its own"
done < <(cd "$prefix/include" && find bnorm -name '*.h' | sort)
echo '#include <bnorm/c_api.h>' | "$cc" -std=c99 -fsyntax-only -Wall -Wextra -Wpedantic -Werror \
  -I"$prefix/include" -x c - || fail "<bnorm/c_api.h> is not C99"
echo "$(cd "$prefix/include" && find bnorm -name '*.h' | wc -l) headers"

step "bnorm::Status is [[nodiscard]]: an ignored Status does not compile with -Werror=unused-result"
nd=("$cxx" -std=c++20 -fsyntax-only -Werror=unused-result -I"$prefix/include" "$here/nodiscard.cc")
"${nd[@]}" || fail "the Status-returning nodiscard.cc does not compile"
"${nd[@]}" -DBNORM_VOID_STATUS || fail "a Status cast to void does not compile"
if "${nd[@]}" -DBNORM_IGNORE_STATUS 2>"$tmp/nodiscard.log"; then
  fail "an ignored bnorm::Status compiled with -Werror=unused-result"
fi
grep -q "ignoring return" "$tmp/nodiscard.log" || { cat "$tmp/nodiscard.log"; fail "not the nodiscard error"; }
grep -m1 "ignoring return" "$tmp/nodiscard.log"

step "(a) the core with find_package(bnorm), MPI hidden: examples/quickstart.cc, shared and static"
consumer core "$here/core" -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DQUICKSTART="$src/examples/quickstart.cc"
LD_LIBRARY_PATH="$libdir" "$tmp/core/quickstart_shared"
env -u LD_LIBRARY_PATH "$tmp/core/quickstart_static"
needed() { readelf -d "$1" | grep NEEDED || true; }
grep -q 'libbnorm' <<<"$(needed "$tmp/core/quickstart_static")" && fail "quickstart_static needs libbnorm.so"
grep -q 'libbnorm\.so\.0' <<<"$(needed "$tmp/core/quickstart_shared")" || fail "quickstart_shared does not link libbnorm.so.0"

if [ "$nn_built" = ON ]; then
  step "(b) find_package(bnorm COMPONENTS nn io): train, save, load"
  consumer nn "$here/nn"
  "$tmp/nn/nn_consumer" "$tmp/nn/checkpoint.safetensors"
else
  echo "== (b) skipped: this build has no bnorm_nn/bnorm_io"
fi

step "(c) C with pkg-config, against libbnorm.so and libbnorm.a"
export PKG_CONFIG_PATH=$libdir/pkgconfig
echo "pkg-config --cflags --libs bnorm: $(pkg-config --cflags --libs bnorm)"
static_libs=$(pkg-config --static --libs bnorm)
echo "pkg-config --static --libs bnorm: $static_libs"
for l in -lbnorm -lhwy -lstdc++ -lpthread -lm; do
  [[ " $static_libs " == *" $l "* ]] || fail "pkg-config --static --libs bnorm lacks $l"
done
# shellcheck disable=SC2046
"$cc" -std=c99 -Wall -Wextra -Werror -o "$tmp/c_shared" "$here/c/c_consumer.c" \
  $(pkg-config --cflags --libs bnorm) -lm || fail "C consumer: shared link"
LD_LIBRARY_PATH="$libdir" "$tmp/c_shared"
# GNU ld's -l:libbnorm.a picks the archive where -lbnorm would take the shared library.
# shellcheck disable=SC2046,SC2086
"$cc" -std=c99 -Wall -Wextra -Werror -o "$tmp/c_static" "$here/c/c_consumer.c" \
  $(pkg-config --cflags bnorm) ${static_libs/-lbnorm/-l:libbnorm.a} || fail "C consumer: static link"
grep -q 'libbnorm' <<<"$(needed "$tmp/c_static")" && fail "c_static needs libbnorm.so"
grep -q 'libbnorm\.so\.0' <<<"$(needed "$tmp/c_shared")" || fail "c_shared does not link libbnorm.so.0"
env -u LD_LIBRARY_PATH "$tmp/c_static"

if [ "$mpi_built" = ON ]; then
  step "(d) find_package(bnorm COMPONENTS mpi) from C++ only, on 2 ranks"
  consumer mpi "$here/mpi"
  bash "$src/tests/mpi/run_mpi.sh" 2 "$tmp/mpi/mpi_consumer"
  # The same package as if built without MPI: asking for mpi fails, saying why.
  cp -a "$prefix" "$tmp/nompi"
  sed -i 's/^set(_bnorm_built_mpi TRUE)/set(_bnorm_built_mpi FALSE)/' "$tmp/nompi/${cmakedir#"$prefix"/}/bnormConfig.cmake"
  nompi_prefix=$tmp/nompi
else
  nompi_prefix=$prefix
fi
step "find_package(bnorm COMPONENTS mpi) where it was not built, and an unknown component: clear errors"
if "$cmake" -S "$here/mpi" -B "$tmp/nompi-consumer" -DCMAKE_PREFIX_PATH="$nompi_prefix" \
     -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_CXX_COMPILER="$cxx" >"$tmp/nompi.log" 2>&1; then
  fail "find_package(bnorm COMPONENTS mpi) succeeded on a package without it"
fi
grep -q 'component "mpi" (bnorm::bnorm_mpi) is not installed' "$tmp/nompi.log" || { cat "$tmp/nompi.log"; fail "no clear message"; }
mkdir -p "$tmp/unknown"
printf 'cmake_minimum_required(VERSION 3.20)\nproject(u LANGUAGES CXX)\nfind_package(bnorm REQUIRED COMPONENTS cuda)\n' >"$tmp/unknown/CMakeLists.txt"
if "$cmake" -S "$tmp/unknown" -B "$tmp/unknown/b" -DCMAKE_PREFIX_PATH="$prefix" \
     -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_CXX_COMPILER="$cxx" >"$tmp/unknown.log" 2>&1; then
  fail "find_package(bnorm COMPONENTS cuda) succeeded"
fi
grep -q 'Unknown component "cuda"' "$tmp/unknown.log" || { cat "$tmp/unknown.log"; fail "no clear message"; }
echo "both fail, naming the component"

step "cpack -G DEB: libbnorm0, libbnorm-dev, bnorm, python3-bnorm"
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found (Debian: dpkg)"
"$cpack" -G DEB --config "$build/CPackConfig.cmake" -B "$tmp/deb" >"$tmp/cpack.log" 2>&1 || { cat "$tmp/cpack.log"; fail "cpack"; }
deb() { compgen -G "$tmp/deb/$1_*.deb" | head -1 || true; }
runtime=$(deb libbnorm0) dev=$(deb libbnorm-dev) tools=$(deb bnorm)
[ -n "$runtime" ] && [ -n "$dev" ] || { ls "$tmp/deb"; fail "missing packages"; }
if [ -e "$build/bin/bnorm" ]; then
  [ -n "$tools" ] || fail "no package bnorm for the CLI"
else
  [ -z "$tools" ] || fail "a package bnorm without the CLI"
  tools=$runtime  # nothing more to check
fi
for d in "$runtime" "$dev" "$tools"; do
  echo "$(basename "$d"): Depends: $(dpkg-deb -f "$d" Depends)"
done
# Listings first: grep -q on dpkg-deb's pipe would cut it short (SIGPIPE, fatal with pipefail).
declare -A listing
for d in "$runtime" "$dev" "$tools"; do listing[$d]=$(dpkg-deb -c "$d"); done
has() {  # deb, what, grep -E regex
  grep -Eq "$3" <<<"${listing[$1]}" || fail "$(basename "$1") has no $2"
}
has_dep() {  # deb, package name
  [[ ", $(dpkg-deb -f "$1" Depends)," == *", $2"[\ ,]* ]] || fail "$(basename "$1") does not depend on $2"
}
has "$runtime" libbnorm.so.0 '\./usr/lib/(.*/)?libbnorm\.so\.0 -> '
grep -Eq 'include/|\.a$|\.so -> ' <<<"${listing[$runtime]}" && fail "the runtime package holds dev files"
for p in libc6 libstdc++6 libhwy1; do has_dep "$runtime" "$p"; done
dpkg-deb -f "$runtime" Section | grep -qx libs || fail "libbnorm0 is not in section libs"
has "$dev" batch_norm.h '\./usr/include/bnorm/batch_norm\.h$'
has "$dev" libbnorm.a '\./usr/lib/(.*/)?libbnorm\.a$'
has "$dev" the libbnorm.so link '\./usr/lib/(.*/)?libbnorm\.so -> '
has "$dev" bnormConfig.cmake '\./usr/lib/(.*/)?cmake/bnorm/bnormConfig\.cmake$'
has "$dev" bnorm.pc '\./usr/lib/(.*/)?pkgconfig/bnorm\.pc$'
if [ "$nn_built" = ON ]; then
  has "$dev" libbnorm_nn.a '/libbnorm_nn\.a$'
  has "$dev" io/safetensors.h '\./usr/include/bnorm/io/safetensors\.h$'
fi
has_dep "$dev" "libbnorm0 (= $(dpkg-deb -f "$runtime" Version))"
has_dep "$dev" libhwy-dev
pc=$(grep -Eo '\./usr/lib/\S*bnorm\.pc' <<<"${listing[$dev]}")
dpkg-deb --fsys-tarfile "$dev" | tar -xO "$pc" >"$tmp/packaged.pc"
grep -qx 'prefix=/usr' "$tmp/packaged.pc" || fail "the packaged bnorm.pc does not say prefix=/usr"
if [ -e "$src/python/CMakeLists.txt" ]; then
  py=$(deb python3-bnorm)
  [ -n "$py" ] || fail "no python3-bnorm package"
  grep -Eq '\./usr/lib/python3/dist-packages/bnorm/__init__\.py$' <<<"$(dpkg-deb -c "$py")" ||
    fail "python3-bnorm has no bnorm/__init__.py"
  has_dep "$py" "libbnorm0 (= $(dpkg-deb -f "$runtime" Version))"
  echo "$(basename "$py"): Depends: $(dpkg-deb -f "$py" Depends)"
fi
if [ -e "$build/bin/bnorm" ]; then
  has "$tools" the bnorm command '\./usr/bin/bnorm$'
  has_dep "$tools" libc6
  if [ "$nn_built" = ON ]; then has_dep "$tools" libopenblas0; has_dep "$tools" zlib1g; fi
fi
echo "run_install_test: all consumers built and ran; packages checked (${SECONDS}s)"
