// Consumer (d) of the installed package: bnorm::bnorm_mpi's mpi_world() on the ranks mpirun
// started; an all-reduce of (rank + 1) must give size * (size + 1) / 2 on every rank.
#include <cstdio>
#include <vector>

#include "bnorm/comm.h"

int main(int argc, char** argv) {
  bnorm::Communicator* world = nullptr;
  if (auto s = bnorm::mpi_world(&argc, &argv, &world, 30.0); !s.ok()) {
    std::fprintf(stderr, "mpi_consumer: %s\n", s.to_string().c_str());
    return 1;
  }
  std::vector<double> v = {static_cast<double>(world->rank() + 1)};
  if (auto s = world->allreduce_sum(v); !s.ok()) {
    std::fprintf(stderr, "mpi_consumer: %s\n", s.to_string().c_str());
    return 1;
  }
  const int n = world->size();
  if (v[0] != n * (n + 1) / 2.0) {
    std::fprintf(stderr, "mpi_consumer: rank %d: sum %g, expected %g\n", world->rank(), v[0],
                 n * (n + 1) / 2.0);
    return 1;
  }
  std::printf("mpi_consumer: rank %d of %d: all-reduce OK\n", world->rank(), n);
  return 0;
}
