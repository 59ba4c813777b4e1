// Data-parallel training on a bnorm::Communicator (bnorm/comm.h), PyTorch's
// DistributedDataParallel in small: each of K ranks holds a replica of the same model, trains on
// its shard of every global batch, and one all-reduce per step sums the gradients, so every
// replica takes the same SGD step. Only Communicator is used: the in-process group (K threads,
// the tests) and MPI (mpirun, bnorm train) run the same code. With no communicator (nullptr) or
// a group of one rank it is plain one-process training and no collective is made.
//
// Collectives. A call marked "collective" must be made by every rank of the group, in the same
// order. The errors it detects are collective: every rank returns an error (the rank at fault
// its own message, the others a message naming that rank), so no rank is left waiting. An error
// that a rank's own model raises in the middle of a training step (its shard has the wrong
// shape, a layer rejects its input) is returned on that rank only, because the other ranks may
// already wait in a collective of that step: the caller must then end the group
// (Communicator::abort), as bnorm train does. (Synchronized batch norm's own input checks are
// collective: comm.h.)
//
// Thread safety: a DataParallel, like its model, is used by one thread at a time (its rank's).
#ifndef BNORM_NN_DATA_PARALLEL_H_
#define BNORM_NN_DATA_PARALLEL_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "bnorm/comm.h"
#include "bnorm/nn/module.h"
#include "bnorm/nn/optim.h"
#include "bnorm/nn/tensor.h"
#include "bnorm/status.h"

namespace bnorm::nn {

// ----- Sharding ----------------------------------------------------------------------------

// n items split into k contiguous shards in rank order, as evenly as possible (the first n % k
// ranks get one item more): rank r holds [shard_begin(n, k, r), shard_begin(n, k, r + 1)).
// Requires n >= 0, k >= 1 and 0 <= r <= k (r == k gives n).
int64_t shard_begin(int64_t n, int k, int r);
// The k shard sizes of n items, in rank order (they sum to n).
std::vector<int64_t> shard_sizes(int64_t n, int k);

// ----- Agreement and replica checks --------------------------------------------------------

// Collective (when comm is not null). Every rank passes its own status: returns OK on every rank
// when all are OK; otherwise a failed rank returns its own status and every other rank
// InvalidArgument "<what>: rank <r> failed (see its message); every rank stops", r the lowest
// failed rank. Lets a rank that fails before a collective (a missing file, a bad option) end
// every rank with an error instead of leaving them waiting. One all-reduce of size() doubles.
// comm == nullptr returns mine.
Status agree(Communicator* comm, const Status& mine, const std::string& what);

// A 48-bit hash (FNV-1a, shifted right 16 bits: exact in a double, so ranks can all-reduce it)
// of model's state: every entry's name, dtype, shape and flags (is_parameter, grad_is_global),
// then every parameter's and buffer's bytes. Replicas with equal state give equal hashes.
uint64_t state_hash(Module& model);

// Collective (when comm is not null and has more than one rank; otherwise OK at once). Fails on
// every rank unless every rank's model state is bit for bit rank 0's: InvalidArgument "rank <r>'s
// model has another layout than rank 0's (entry names, shapes, dtypes or flags): the ranks must
// build the same model" when the layouts differ, else Internal "rank <r>'s parameters or buffers
// differ from rank 0's after step <step> (replicas diverged)", r the lowest such rank. One
// all-reduce of size() doubles (a second one only on a mismatch, to tell the two apart).
Status check_replicas(Communicator* comm, Module& model, int64_t step);

// ----- Evaluation of a classifier ----------------------------------------------------------

// A labelled set of samples in memory (not owned): sample i's values are sample_numel() floats
// at inputs + i * sample_numel(), its class labels[i].
struct ClassificationData {
  const float* inputs = nullptr;
  std::span<const int32_t> labels;
  std::vector<int64_t> sample_shape;  // one sample's shape: {784}, {1, 28, 28}

  int64_t count() const { return static_cast<int64_t>(labels.size()); }
  int64_t sample_numel() const {
    int64_t n = 1;
    for (int64_t d : sample_shape) n *= d;
    return n;
  }
};

struct EvalResult {
  double loss = 0;      // mean softmax cross-entropy per sample
  double accuracy = 0;  // fraction of samples whose first arg-max logit is the label
};

// Samples [begin, end) of data through model in batches of batch_size (the last one may be
// smaller), in the model's current mode (in training mode batch-norm running statistics move:
// save and restore them around the call). Writes the sum over the samples of their
// cross-entropy (each batch's mean times its rows, summed in double) to *loss_sum and the number
// classified correctly to *correct. on_batch, when given, is called after each batch's forward
// with its row count: the model's outputs (Sequential::output) are then that batch's.
// Requires 0 <= begin <= end <= data.count(), batch_size >= 1, data.inputs not null when
// begin < end; an error (also the model's or the loss's, e.g. a label out of range) leaves
// *loss_sum and *correct unchanged.
Status evaluate_classifier_range(Module& model, const ClassificationData& data, int64_t begin,
                                 int64_t end, int64_t batch_size, double* loss_sum,
                                 int64_t* correct,
                                 const std::function<void(int64_t rows)>& on_batch = {});

// The loss and accuracy over all of data (evaluate_classifier_range over [0, count), divided by
// count). Requires data.count() >= 1.
Status evaluate_classifier(Module& model, const ClassificationData& data, int64_t batch_size,
                           EvalResult* out,
                           const std::function<void(int64_t rows)>& on_batch = {});

// ----- The data-parallel helper ------------------------------------------------------------

struct DataParallelOptions {
  // Samples per step over all ranks (the global batch), split by shard_sizes(global_batch, K);
  // >= the number of ranks (every rank needs a sample). The same on every rank.
  int64_t global_batch = 0;
  // True: the model's batch-norm layers normalize over the global batch (Module::set_sync with
  // the group and sync_mode, and set_sync_split with the shard sizes): their weight and bias
  // gradients are then the global batch's already and are not all-reduced. False: each rank's
  // batch norm uses its own shard's statistics, and after every step every rank adopts rank 0's
  // running statistics (PyTorch DDP's broadcast_buffers). Ignored without a communicator.
  bool sync_batch_norm = false;
  SyncMode sync_mode = SyncMode::kReproducible;
};

// What a training step gives, the same on every rank.
struct StepResult {
  // The global batch's mean cross-entropy. With several ranks it travels in the step's float
  // all-reduce (each rank's shard sum, summed in rank order, divided by the global batch):
  // within float rounding of one process's double mean.
  double loss = 0;
  int64_t correct = 0;  // samples of the global batch classified correctly
  // False: the loss was not finite (the run diverged) and the step was not taken: no
  // parameter changed (with one process, not even a backward ran).
  bool finite = true;
};

class DataParallel {
 public:
  DataParallel() = default;
  DataParallel(DataParallel&&) = default;
  DataParallel& operator=(DataParallel&&) = default;

  // Collective. Prepares data-parallel training of *model over comm's ranks (nullptr: one
  // process): with options.sync_batch_norm, synchronizes the model's batch norms (see above);
  // then checks in one all-reduce of size() doubles that every rank's options are valid and
  // equal and that every rank's model is rank 0's, layout and values (the replicas must start
  // equal: build them from the same seed). Fails on every rank, naming the rank at fault: a null
  // model or out, global_batch < the ranks, options or models that differ between ranks. The
  // model and the communicator must outlive *out, and the model's structure must not change.
  // The group's counters count the check (calls and bytes), like every exchange below.
  static Status create(Communicator* comm, Module* model, const DataParallelOptions& options,
                       DataParallel* out);

  Communicator* communicator() const { return comm_; }
  Module& model() const { return *model_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  // More than one rank: the steps all-reduce and evaluate() shards.
  bool distributed() const { return ranks_ > 1; }
  // Whether the model's batch norms were synchronized (options.sync_batch_norm with a
  // communicator).
  bool sync_batch_norm() const { return sync_batch_norm_; }
  int64_t global_batch() const { return global_batch_; }
  // Every rank's shard size, in rank order (shard_sizes(global_batch, ranks)).
  const std::vector<int64_t>& split() const { return split_; }
  // This rank's shard of each global batch: samples [shard_begin, shard_begin + shard_size).
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_size() const { return split_[static_cast<size_t>(rank_)]; }
  // shard_size / global_batch as a float: the factor a rank's loss gradient (of its shard's
  // mean loss) takes so that the gradients summed over the ranks are those of the global batch's
  // mean loss. Applied only with several ranks.
  float gradient_scale() const { return gradient_scale_; }
  // Successful replica checks with several ranks (create's and check_replicas'); 0 otherwise.
  int64_t replica_checks_passed() const { return replica_checks_; }

  // One SGD step of the global batch's mean softmax cross-entropy, from this rank's shard:
  // x (shard_size() samples: [shard_size(), ...] as the model takes them) and labels (its
  // shard_size() classes). Zeroes the gradients, runs the forward, the loss and (with several
  // ranks, the loss gradient scaled by gradient_scale()) the backward, all-reduces
  // (allreduce_gradients), then sgd->step() with sgd's current learning rate. Collective with
  // several ranks (one all-reduce, plus synchronized batch norm's). sgd must hold the model's
  // parameters(). A non-finite global loss is not an error: out->finite is false and no
  // parameter changes. Errors: out or sgd null, x or labels not of shard_size() samples, the
  // model's and the loss's errors: local (see the top of this file) unless the synchronized
  // batch norms detect them.
  Status train_step(const Tensor& x, std::span<const int32_t> labels, Sgd* sgd, StepResult* out);

  // The exchange of train_step, for a caller that runs its own forward and backward (each rank
  // on its shard, the loss gradient scaled by gradient_scale()). Collective with several ranks:
  // one all-reduce of floats carries every parameter gradient except the synchronized batch
  // norms' (grad_is_global), without sync_batch_norm rank 0's float buffers (every other rank
  // sends zeros and adopts them), and the loss and count correct. Then every gradient is the
  // global batch's, on every rank. On entry *loss is this rank's mean loss over its shard and
  // *correct its count; on return they are the global batch's (as StepResult). With one rank,
  // nothing is exchanged or changed. Fails (nothing written) when out pointers are null or the
  // all-reduce fails: the in-process group fails every rank when the ranks' buffer lengths
  // differ; MPI cannot tell, which is why create() checks that every rank's layout is the same.
  Status allreduce_gradients(double* loss, int64_t* correct);

  // Collective with several ranks: check_replicas(comm, model, step) (the free function);
  // counts a success in replica_checks_passed().
  Status check_replicas(int64_t step);

  // With several ranks, collective: each rank evaluates its shard of data (shard_begin(count,
  // K, r), in batches of batch_size, in the model's current mode, which must be eval mode) and
  // one all-reduce of 2 doubles sums the losses and the counts correct; every rank must pass the
  // same data. A rank whose evaluation fails still takes part in the all-reduce, so every rank
  // fails (the others with "evaluation: a rank failed (see its message); every rank stops").
  // With one rank: evaluate_classifier. on_batch as there (with several ranks, for this rank's
  // batches).
  Status evaluate(const ClassificationData& data, int64_t batch_size, EvalResult* out,
                  const std::function<void(int64_t rows)>& on_batch = {});

 private:
  // A stretch of the fused all-reduce buffer: a gradient to sum, or a buffer of rank 0's.
  struct Segment {
    float* data = nullptr;
    int64_t n = 0;
    bool from_lead = false;  // rank 0's values (the others send zeros), not a sum
  };

  Communicator* comm_ = nullptr;
  Module* model_ = nullptr;
  int rank_ = 0;
  int ranks_ = 1;
  bool sync_batch_norm_ = false;
  int64_t global_batch_ = 0;
  std::vector<int64_t> split_ = {0};
  int64_t shard_begin_ = 0;
  float gradient_scale_ = 1.0f;
  int64_t replica_checks_ = 0;
  std::vector<Segment> segments_;
  std::vector<float> fused_;  // segments, then this rank's loss sum and count correct
  Tensor logits_, dlogits_;
};

}  // namespace bnorm::nn

#endif  // BNORM_NN_DATA_PARALLEL_H_
