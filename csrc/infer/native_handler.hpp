// A model that runs whole batches in native code. fastml.infer.Batcher calls
// a NativeHandler directly on its worker thread without taking the GIL;
// fastml.infer.Forest is one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/array_view.hpp"
#include "common/buffer.hpp"

namespace fastml::infer {

struct HandlerOutput {
  BufferPtr buffer;  // C-contiguous result
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // shape[0] must equal the batch's rows
};

class NativeHandler {
 public:
  virtual ~NativeHandler() = default;
  // Runs one batch: `batch` is C-contiguous with shape[0] rows. Must be safe
  // to call from several threads at once, and must not touch Python.
  virtual HandlerOutput run(const ArrayView& batch) = 0;
  // Checks a request's dtype and trailing shape before it is queued; throws
  // std::invalid_argument / fastml::TypeError naming `name` when it cannot be run.
  virtual void check_input(const ArrayView& request, const char* name) const = 0;
  virtual std::string handler_name() const = 0;
  // Dimensions of one row of input (Forest: 1, a vector of features): a
  // request with exactly this many dimensions is one row without its batch
  // dimension, answered with one row of output. -1: rows always along axis 0.
  virtual int row_ndim() const { return -1; }
};

}  // namespace fastml::infer
