// bnorm_mpi without MPI (BNORM_MPI=OFF, or MPI not found): the same symbols, so that programs
// link bnorm::bnorm_mpi unconditionally and learn at run time that MPI is absent.
#include <cstdlib>

#include "bnorm/comm.h"

namespace bnorm {

bool mpi_compiled() { return false; }

// The same check as mpi_communicator.cc's: a program started by mpirun against a build without
// MPI can then say so instead of running as K independent copies.
bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

Status mpi_world(int* /*argc*/, char*** /*argv*/, Communicator** out, double /*timeout_seconds*/) {
  if (out != nullptr) *out = nullptr;
  return Status::invalid_argument(
      "bnorm was built without MPI (configure with -DBNORM_MPI=ON and install libopenmpi-dev)");
}

}  // namespace bnorm
