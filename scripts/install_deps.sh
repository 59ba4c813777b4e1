#!/usr/bin/env bash
# Installs what bnorm needs on Debian 12 with apt-get (as root, or through sudo).
#   install_deps.sh build   compiler, CMake and the libraries bnorm builds on: Highway (SIMD),
#                           OpenBLAS, zlib, nlohmann-json, CLI11, OpenMPI (bnorm_mpi and mpirun
#                           for the MPI tests); Fashion-MNIST and matplotlib for `bnorm train`
#                           and its report
#   install_deps.sh test    + GoogleTest, and python3-torch, torchvision + numpy for the
#                           conformance suite and the bnorm.torch tests; dpkg-dev and file
#                           for the Debian packages' dependencies (cpack -G DEB, tests/install);
#                           clang and its libFuzzer runtime for the fuzz targets (tests/fuzz/)
#   install_deps.sh bench   + oneDNN, python3-torch and torchvision: the benchmark peers
# Packages already installed are not installed again.
set -euo pipefail

what=${1:-test}
packages=(cmake gcc g++ make pkg-config libhwy-dev libopenblas-dev zlib1g-dev nlohmann-json3-dev
  libcli11-dev libopenmpi-dev openmpi-bin dataset-fashion-mnist python3 python3-matplotlib)
case "$what" in
  build) ;;
  test) packages+=(libgtest-dev python3-numpy python3-torch python3-torchvision dpkg-dev file
    clang libclang-rt-14-dev) ;;
  bench) packages+=(libdnnl-dev python3-numpy python3-torch python3-torchvision) ;;
  *) echo "install_deps.sh: unknown set '$what' (expected build, test or bench)" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install_deps.sh: need root or sudo to install: ${missing[*]}" >&2
  exit 1
fi
echo "install_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
