// The synchronized passes with an error found before them (the C API's argument checks): a rank
// with such an error still takes part in the exchange, with its error flag set, so that every
// rank fails together instead of waiting for it.
#ifndef BNORM_SRC_COMM_SYNC_DETAIL_H_
#define BNORM_SRC_COMM_SYNC_DETAIL_H_

#include "bnorm/comm.h"

namespace bnorm::detail {

// As bnorm::sync_forward_train / sync_backward; when prior is not OK it is this rank's error
// (args are then not read, except x's channel count for the size of a fused exchange).
Status sync_forward_train(Communicator& comm, const ForwardTrainArgs& args,
                          const CallOptions& options, const SyncOptions& sync,
                          const Status& prior);
Status sync_backward(Communicator& comm, const BackwardArgs& args, const CallOptions& options,
                     const SyncOptions& sync, const Status& prior);

}  // namespace bnorm::detail

#endif  // BNORM_SRC_COMM_SYNC_DETAIL_H_
