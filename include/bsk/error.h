// Errors thrown by libbsk. Every precondition failure names the argument and the rule it broke,
// so a user can fix the call without reading the library.
#pragma once

#include <stdexcept>
#include <string>

namespace bsk {

// A bad argument: wrong dtype, shape, stride, device, value range, ...
class InvalidArgument : public std::invalid_argument {
 public:
  InvalidArgument(const std::string& argument, const std::string& rule)
      : std::invalid_argument("bsk: argument '" + argument + "': " + rule),
        argument_(argument) {}
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

// A valid request this build or this machine cannot serve (no GPU, arch not compiled, ...).
class Unsupported : public std::runtime_error {
 public:
  explicit Unsupported(const std::string& what) : std::runtime_error("bsk: " + what) {}
};

// A CUDA runtime call or kernel launch failed.
class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error("bsk: CUDA error: " + what) {}
};

}  // namespace bsk
