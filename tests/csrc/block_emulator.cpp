// Runs the block-cooperative CUDA arithmetic of csrc/cuda/smallmat_block.cuh on the CPU.
//
// A "block" is a team of std::threads that meet at a barrier in sync(), which is what
// __syncthreads() is to a CUDA block; the block-shared scratch is a plain array. Compiled with
// -fsanitize=thread by tests/test_block_kernels.py, so a missing barrier (a data race between
// two "threads" of a block) fails the test, and a barrier some thread skips hangs it (the test
// runs this program with a timeout).
//
// usage: block_emulator OP DTYPE BATCH K N THREADS BLOCKS IN_A IN_B OUT INFO
//   OP     inv_sqrt_spd | cholesky_upper_inverse | solve
//   DTYPE  f32 | f64
//   N      right-hand sides of solve (ignored otherwise)
//   BLOCKS blocks run one after the other; block g takes matrices g, g + BLOCKS, ...
//          (the CUDA grid-stride loop), each with its own workspace
//   IN_A   (BATCH, K, K) raw, row-major; IN_B (BATCH, K, N) raw for solve, "-" otherwise
//   OUT    written: (BATCH, K, K) or (BATCH, K, N) raw; INFO written: BATCH int32
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda/smallmat_block.cuh"

namespace {

// A reusable barrier on a mutex and a condition variable (ThreadSanitizer models both exactly).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  int waiting_ = 0;
  long generation_ = 0;
};

struct ThreadBlock {
  int t;
  int n;
  Barrier* barrier;
  int tid() const { return t; }
  int size() const { return n; }
  void sync() const { barrier->arrive_and_wait(); }
};

template <typename T>
std::vector<T> read_file(const char* path, size_t count) {
  std::vector<T> v(count);
  if (std::strcmp(path, "-") == 0) return v;
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!f) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", count, path);
    std::exit(2);
  }
  return v;
}

template <typename T>
void write_file(const char* path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

template <typename T>
int run(const std::string& op, int64_t batch, int k, int n, int threads, int blocks,
        const char* in_a, const char* in_b, const char* out_path, const char* info_path) {
  namespace blk = stiefel_kernels::block;
  const bool is_solve = op == "solve";
  const int cols = is_solve ? n : k;
  const std::vector<T> a = read_file<T>(in_a, static_cast<size_t>(batch) * k * k);
  const std::vector<T> b = read_file<T>(is_solve ? in_b : "-", static_cast<size_t>(batch) * k * cols);
  std::vector<T> out(static_cast<size_t>(batch) * k * cols);
  std::vector<int32_t> info(static_cast<size_t>(batch), 12345);
  int64_t ws_per;
  if (op == "inv_sqrt_spd") {
    ws_per = blk::inv_sqrt_spd_workspace_doubles(k);
  } else if (op == "cholesky_upper_inverse") {
    ws_per = blk::cholesky_upper_inverse_workspace_doubles(k);
  } else if (is_solve) {
    ws_per = blk::solve_workspace_doubles(k, n);
  } else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  for (int g = 0; g < blocks; ++g) {
    // Poisoned workspace: a read before a write shows up as NaN in the result.
    std::vector<double> ws(static_cast<size_t>(ws_per) + 1, blk::quiet_nan());
    std::vector<double> red(threads, blk::quiet_nan());
    std::vector<int> redi(threads, -7);
    Barrier barrier(threads);
    std::vector<std::thread> team;
    for (int t = 0; t < threads; ++t) {
      team.emplace_back([&, t] {
        const ThreadBlock tb{t, threads, &barrier};
        if (op == "inv_sqrt_spd") {
          blk::inv_sqrt_spd_batch(tb, a.data(), out.data(), info.data(), batch, k, g, blocks,
                                  ws.data(), red.data());
        } else if (op == "cholesky_upper_inverse") {
          blk::cholesky_upper_inverse_batch(tb, a.data(), out.data(), info.data(), batch, k, g,
                                            blocks, ws.data(), red.data());
        } else {
          blk::solve_batch(tb, a.data(), b.data(), out.data(), info.data(), batch, k, n, g,
                           blocks, ws.data(), red.data(), redi.data());
        }
      });
    }
    for (auto& th : team) th.join();
  }
  write_file(out_path, out);
  write_file(info_path, info);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr,
                 "usage: %s OP DTYPE BATCH K N THREADS BLOCKS IN_A IN_B OUT INFO\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  const std::string dtype = argv[2];
  const int64_t batch = std::atoll(argv[3]);
  const int k = std::atoi(argv[4]);
  const int n = std::atoi(argv[5]);
  const int threads = std::atoi(argv[6]);
  const int blocks = std::atoi(argv[7]);
  if (threads < 1 || blocks < 1) return 2;
  if (dtype == "f32") return run<float>(op, batch, k, n, threads, blocks, argv[8], argv[9], argv[10], argv[11]);
  if (dtype == "f64") return run<double>(op, batch, k, n, threads, blocks, argv[8], argv[9], argv[10], argv[11]);
  std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
  return 2;
}
