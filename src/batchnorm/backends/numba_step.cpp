// The eager training and eval steps of the "numba" backend, without Python on the way.
//
// A training step through the Python layers costs 0.15-0.35 ms of interpreter time on top
// of the kernels (more when another layer has evicted the interpreter's code and data from
// the caches), which on small layers is more than ATen's whole step. Here the same compiled
// numba entries run from C++, and the backward is a C++ autograd node that autograd's engine
// calls directly. See numba_step.py for how a recipe is made and when this path is taken.
//
// A recipe is one packed kernel call with its tensors' addresses left open: the int64 buffer
// that numba_entry.PackedCall would hold (counters, phase, checksum, arguments), a list of
// (slot, source, offset) patches that put a call's tensor addresses in, and the phases to
// run. Everything else in it (shape, task split, flags, floats) depends only on what the
// recipe's key holds, so a call copies the template, patches it and runs the phases, each
// a GOMP_parallel region of torch's own OpenMP runtime, as the Python path does.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace py = pybind11;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

typedef void (*entry_fn)(int64_t*);
typedef void (*gomp_fn)(void (*)(void*), void*, unsigned, unsigned);

// numba_entry's buffer layout (checked against the Python constants at load: set_layout).
int64_t g_ctl_next = 0, g_ctl_done = 8, g_phase = 16, g_units = 17;
constexpr int64_t kMaxThreads = 64;
std::atomic<gomp_fn> g_gomp{nullptr};

// Sources a patch can take an address from (numba_step.py: _FWD, _BWD, _ACT_BWD). Forward:
// x, y, mean, invstd, weight, bias, running mean and var, their new values, residual,
// scratch, var (eval), activation mask. Backward: dy, x, dx, mean, invstd, weight, sum_dy,
// sum_dy_xmu, dweight, (unused), (unused), scratch; the fused activation's as in TrainAct.
constexpr int kSources = 14;
constexpr int kScratch = 11;

struct Recipe {
  entry_fn entry = nullptr;
  std::vector<int64_t> templ;
  std::vector<std::array<int64_t, 3>> patches;  // slot, source, offset
  std::vector<std::array<int64_t, 3>> phases;   // phase, units, parallel
  int64_t scratch_bytes = 0;
  bool small = false;
  // what the recipe was made for, checked on every call
  std::vector<int64_t> sizes, strides, out_strides;
  at::ScalarType dtype = at::kFloat;
  int64_t backward = -1;  // first of the 4 backward recipes (dx?, dweight?), or -1
  // bytes of the activation mask the forward writes (numba_act.act_mask), 0: none
  int64_t mask_bytes = 0;
};

constexpr int64_t kMaxRecipes = 32768;  // 4096 training keys of 5 recipes, and eval's
std::array<std::atomic<Recipe*>, kMaxRecipes> g_recipes{};
std::atomic<int64_t> g_count{0};
std::mutex g_add;

const Recipe& recipe(int64_t id) {
  TORCH_CHECK(id >= 0 && id < g_count.load(), "batchnorm numba step: unknown recipe ", id);
  return *g_recipes[id].load(std::memory_order_acquire);
}

// ---- recycled outputs ---------------------------------------------------------------------
// As cpu_outputs.py does for the Python path: outputs of 1 MiB and more come from storages
// that nothing references any more (use count 1: only the pool), so their pages are not
// faulted in afresh on every call.

constexpr int64_t kPoolMin = 1 << 20;
constexpr int64_t kHugeMin = 1 << 23;
constexpr int64_t kHuge = 1 << 21;

struct PoolEntry {
  c10::Storage storage;
  int64_t tick;
  const void* data;
};

struct Pool {
  std::mutex m;
  std::unordered_map<int64_t, std::vector<PoolEntry>> by_size;
  int64_t total = 0, tick = 0, limit = 0;
  bool huge = true;

  static bool free(const PoolEntry& e) { return e.storage.use_count() == 1; }

  c10::Storage take(int64_t nbytes) {
    auto it = by_size.find(nbytes);
    if (it == by_size.end()) return c10::Storage();
    auto& entries = it->second;
    for (int64_t i = (int64_t)entries.size() - 1; i >= 0; --i) {
      if (!free(entries[i])) continue;
      PoolEntry e = std::move(entries[i]);
      entries.erase(entries.begin() + i);
      if ((int64_t)e.storage.nbytes() != nbytes || e.storage.data() != e.data) {
        total -= nbytes;  // resized, or moved to shared memory: not ours any more
        continue;
      }
      e.tick = ++tick;
      entries.push_back(e);
      return e.storage;
    }
    return c10::Storage();
  }

  bool make_room(int64_t nbytes) {
    if (total + nbytes <= limit) return true;
    std::vector<std::tuple<int64_t, int64_t, const void*>> free_ones;  // tick, size, data
    int64_t free_bytes = 0;
    for (auto& kv : by_size)
      for (auto& e : kv.second)
        if (free(e)) {
          free_ones.emplace_back(e.tick, kv.first, e.data);
          free_bytes += kv.first;
        }
    if (total - free_bytes + nbytes > limit) return false;
    std::sort(free_ones.begin(), free_ones.end());
    for (auto& f : free_ones) {
      if (total + nbytes <= limit) break;
      auto& entries = by_size[std::get<1>(f)];
      for (size_t i = 0; i < entries.size(); ++i)
        if (entries[i].data == std::get<2>(f)) {
          entries.erase(entries.begin() + i);
          total -= std::get<1>(f);
          break;
        }
    }
    return true;
  }

  void clear() {
    for (auto it = by_size.begin(); it != by_size.end();) {
      auto& entries = it->second;
      int64_t before = (int64_t)entries.size();
      entries.erase(std::remove_if(entries.begin(), entries.end(), free), entries.end());
      total -= it->first * (before - (int64_t)entries.size());
      it = entries.empty() ? by_size.erase(it) : std::next(it);
    }
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: storages may outlive static teardown
  return *p;
}

c10::Storage new_storage(int64_t nbytes) {
  Pool& p = pool();
  bool pooled = nbytes >= kPoolMin && p.limit > 0;
  if (pooled) {
    std::lock_guard<std::mutex> lock(p.m);
    c10::Storage st = p.take(nbytes);
    if (st) return st;
  }
  c10::Storage st(c10::Storage::use_byte_size_t(), nbytes, c10::GetCPUAllocator(),
                  /*resizable=*/false);
  if (p.huge && nbytes >= kHugeMin) {
    // advice only (transparent huge pages in madvise mode); see numba_backend._advise_huge
    auto start = (reinterpret_cast<uintptr_t>(st.mutable_data()) + kHuge - 1) & ~(kHuge - 1);
    auto end = (reinterpret_cast<uintptr_t>(st.mutable_data()) + nbytes) & ~(kHuge - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
  if (pooled) {
    std::lock_guard<std::mutex> lock(p.m);
    if (p.make_room(nbytes)) {
      p.by_size[nbytes].push_back(PoolEntry{st, ++p.tick, st.data()});
      p.total += nbytes;
    }
  }
  return st;
}

Tensor new_output(const Recipe& r, const Tensor& like) {
  int64_t nbytes = like.numel() * (int64_t)like.element_size();
  auto opts = like.options().memory_format(c10::nullopt);
  if (nbytes < kPoolMin || pool().limit <= 0)
    return at::empty_strided(r.sizes, r.out_strides, opts);
  return at::empty({0}, opts).set_(new_storage(nbytes), 0, r.sizes, r.out_strides);
}

// ---- running a recipe ---------------------------------------------------------------------

int64_t address(const Tensor& t) { return t.defined() ? (int64_t)t.data_ptr() : 0; }

void run(const Recipe& r, const std::array<int64_t, kSources>& sources) {
  // the counters get cache lines of their own (numba_entry: ARGS starts on a fresh line)
  alignas(64) int64_t local[128];
  std::vector<int64_t> heap;
  int64_t* buf = local;
  if (r.templ.size() > 128) {
    heap.resize(r.templ.size() + 8);
    buf = heap.data();
  }
  std::memcpy(buf, r.templ.data(), r.templ.size() * sizeof(int64_t));
  for (const auto& p : r.patches) buf[p[0]] = sources[p[1]] + p[2];
  int64_t nthreads = r.small ? 1 : std::max<int64_t>(1, at::get_num_threads());
  gomp_fn gomp = g_gomp.load(std::memory_order_relaxed);
  for (const auto& ph : r.phases) {
    buf[g_ctl_next] = 0;
    buf[g_ctl_done] = 0;
    buf[g_phase] = ph[0];
    buf[g_units] = ph[1];
    int64_t p = std::min(std::min(ph[2] ? nthreads : int64_t(1), ph[1]), kMaxThreads);
    if (p <= 1 || gomp == nullptr)
      r.entry(buf);
    else
      gomp(reinterpret_cast<void (*)(void*)>(r.entry), buf, (unsigned)p, 0);
    TORCH_CHECK(buf[g_ctl_done] == ph[1], "numba kernel (C++ step): ", buf[g_ctl_done], " of ",
                ph[1], " units of phase ", ph[0], " completed (see the error printed above)");
  }
}

// A per-channel argument the kernels read in place: absent, or a contiguous CPU tensor of the
// accumulation dtype. Anything else leaves the call to the Python path (which converts).
bool channel_ok(const Tensor& t, bool expected, at::ScalarType acc) {
  if (!t.defined()) return !expected;
  return expected && t.device().is_cpu() && t.scalar_type() == acc && t.is_contiguous();
}

bool matches(const Recipe& r, const Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == r.dtype && x.sizes() == r.sizes &&
         x.strides() == r.strides;
}

// A residual the kernels read in place: absent, or laid out and typed as x.
bool residual_ok(const Tensor& r, bool expected, const Tensor& x) {
  if (!r.defined()) return !expected;
  return expected && r.device().is_cpu() && r.scalar_type() == x.scalar_type() &&
         r.sizes() == x.sizes() && r.strides() == x.strides();
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A training forward's kernel call (plain or fused): y written, the batch mean and invstd
// returned, the running buffers updated in place once every phase has completed (a failed
// call changes nothing).
std::pair<Tensor, Tensor> train_forward(const Recipe& r, const Tensor& x, const Tensor& y,
                                        const Tensor& w, const Tensor& b, const Tensor& rm,
                                        const Tensor& rv, const Tensor& residual,
                                        const Tensor& mask = Tensor()) {
  int64_t c = x.size(1);
  auto opts = x.options().dtype(acc_of(x.scalar_type()));
  Tensor mean = at::empty({c}, opts), invstd = at::empty({c}, opts);
  Tensor new_rm, new_rv;
  if (rm.defined()) {
    new_rm = at::empty({c}, opts);
    new_rv = at::empty({c}, opts);
  }
  Tensor scratch = at::empty({r.scratch_bytes}, x.options().dtype(at::kByte));
  run(r, {address(x), address(y), address(mean), address(invstd), address(w), address(b),
          address(rm), address(rv), address(new_rm), address(new_rv), address(residual),
          address(scratch), 0, address(mask)});
  if (rm.defined()) {
    rm.copy_(new_rm);
    rv.copy_(new_rv);
  }
  return {mean, invstd};
}

py::object* g_double_backward = nullptr;  // a Python callable, never freed (see set_...)

struct Train : public torch::autograd::Function<Train> {
  // (optional tensors as std::optional: autograd takes no undefined tensor as an input)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, int64_t id, double eps) {
    const Recipe& r = recipe(id);
    Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    Tensor y = new_output(r, x);
    auto [mean, invstd] = train_forward(r, x, y, w, b, running_mean.value_or(Tensor()),
                                        running_var.value_or(Tensor()), Tensor());
    ctx->save_for_backward({x, w, mean, invstd});
    ctx->saved_data["recipe"] = id;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = w.defined();
    ctx->saved_data["has_bias"] = b.defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], w = saved[1], mean = saved[2], invstd = saved[3];
    // needs_input_grad counts the inputs that were given (absent optional ones have no edge)
    bool has_w = ctx->saved_data["has_weight"].toBool(), has_b = ctx->saved_data["has_bias"].toBool();
    bool ndx = ctx->needs_input_grad(0), ndw = has_w && ctx->needs_input_grad(1),
         ndb = has_b && ctx->needs_input_grad(has_w ? 2 : 1);
    variable_list out(7);
    if (!(ndx || ndw || ndb)) return out;
    Tensor dy = grads[0];
    if (at::GradMode::is_enabled()) {
      // create_graph=True: differentiate the composite (ops._double_backward), as the
      // Python path does, so that second derivatives are exact
      TORCH_CHECK(g_double_backward != nullptr, "batchnorm numba step: no double backward");
      py::gil_scoped_acquire gil;
      py::tuple got = (*g_double_backward)(dy, x, w, mean, invstd, ctx->saved_data["eps"].toDouble(),
                                           ndx, ndw, ndb);
      for (int i = 0; i < 3; ++i)
        if (!got[i].is_none()) out[i] = got[i].cast<Tensor>();
      return out;
    }
    const Recipe& fwd = recipe(ctx->saved_data["recipe"].toInt());
    const Recipe& r = recipe(fwd.backward + (ndx ? 2 : 0) + (ndw ? 1 : 0));
    if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type())
      dy = at::empty_strided(r.sizes, r.out_strides, x.options()).copy_(dy);
    int64_t c = x.size(1);
    auto opts = mean.options();
    Tensor dx = ndx ? new_output(r, x) : Tensor();
    Tensor sum_dy = at::empty({c}, opts), sum_dy_xmu = at::empty({c}, opts);
    Tensor dw = ndw ? at::empty({c}, opts) : Tensor();
    Tensor scratch = at::empty({r.scratch_bytes}, x.options().dtype(at::kByte));
    run(r, {address(dy), address(x), address(dx), address(mean), address(invstd), address(w),
            address(sum_dy), address(sum_dy_xmu), address(dw), 0, 0, address(scratch), 0});
    out[0] = dx;
    out[1] = dw;
    if (ndb) out[2] = sum_dy;
    return out;
  }
};

py::object* g_double_backward_act = nullptr;

// BatchNorm + activation (+ residual), training: y = act(BN(x) + residual). Forward sources:
// as Train's, with the residual at 10 and the activation mask at 13. Backward sources: dy,
// x (in place: y), dx, mean, invstd, weight, sum_dz, sum_dz_xhat, bias, residual, dresidual,
// scratch, activation mask. The backward recipes are three, by what the call does:
// elementwise only, reduction only, both. A recipe with a mask (relu or leaky_relu with a
// residual, out of place: numba_act.act_mask) writes it in the forward and saves it instead
// of the residual, which its backward then does not read.
// In place (``inplace``): y is written over x, which is marked dirty; the kernels read
// ``kernel_weight`` (the weight kept invertible, activations.invertible_weight), and the
// backward recomputes x-hat from y.
struct TrainAct : public torch::autograd::Function<TrainAct> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var,
                        const c10::optional<Tensor>& residual, int64_t id, double eps,
                        const std::string& activation, double slope, bool inplace,
                        const c10::optional<Tensor>& kernel_weight) {
    const Recipe& r = recipe(id);
    Tensor w = (inplace ? kernel_weight : weight).value_or(Tensor());
    Tensor b = bias.value_or(Tensor()), res = residual.value_or(Tensor());
    Tensor y = inplace ? x : new_output(r, x);
    Tensor mask = r.mask_bytes > 0 ? at::zeros({r.mask_bytes}, x.options().dtype(at::kByte))
                                   : Tensor();
    auto [mean, invstd] = train_forward(r, x, y, w, b, running_mean.value_or(Tensor()),
                                        running_var.value_or(Tensor()), res, mask);
    if (inplace) ctx->mark_dirty({x});
    // x: the input, or in place the output written over it (what the backward reads)
    ctx->save_for_backward({x, w, b, mean, invstd, mask.defined() ? Tensor() : res, mask});
    ctx->saved_data["recipe"] = id;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["inplace"] = inplace;
    // needs_input_grad counts the inputs that were given: x, then each optional one present
    auto given = [](const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); };
    int64_t edge = 1;
    ctx->saved_data["edge_w"] = given(weight) ? edge++ : int64_t(-1);
    ctx->saved_data["edge_b"] = given(bias) ? edge++ : int64_t(-1);
    edge += given(running_mean) + given(running_var);
    ctx->saved_data["edge_r"] = given(residual) ? edge : int64_t(-1);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], w = saved[1], b = saved[2], mean = saved[3], invstd = saved[4],
           res = saved[5], mask = saved[6];
    auto needs = [&](const char* key) {
      int64_t e = ctx->saved_data[key].toInt();
      return e >= 0 && ctx->needs_input_grad(e);
    };
    bool ndx = ctx->needs_input_grad(0), ndw = needs("edge_w"), ndb = needs("edge_b"),
         ndr = needs("edge_r");
    variable_list out(12);
    Tensor dy = grads[0];
    if (!(ndx || ndw || ndb || ndr)) return out;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the composite, in Python (which refuses in-place mode)
      TORCH_CHECK(g_double_backward_act != nullptr, "batchnorm numba step: no double backward");
      py::gil_scoped_acquire gil;
      py::object m = mask.defined() ? py::cast(mask) : py::none();
      py::tuple got = (*g_double_backward_act)(
          dy, x, w, b, res, mean, invstd, ctx->saved_data["eps"].toDouble(),
          ctx->saved_data["activation"].toStringRef(), ctx->saved_data["slope"].toDouble(), ndx,
          ndw, ndb, ndr, ctx->saved_data["inplace"].toBool(), py::arg("mask") = m);
      const int slot[4] = {0, 1, 2, 5};
      for (int i = 0; i < 4; ++i)
        if (!got[i].is_none()) out[slot[i]] = got[i].cast<Tensor>();
      return out;
    }
    bool reduce = ndw || ndb || ndx, apply = ndx || ndr;  // (training: dx needs the sums)
    const Recipe& fwd = recipe(ctx->saved_data["recipe"].toInt());
    const Recipe& r = recipe(fwd.backward + (reduce ? 2 : 0) + (apply ? 1 : 0) - 1);
    if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type())
      dy = at::empty_strided(r.sizes, r.out_strides, x.options()).copy_(dy);
    int64_t c = x.size(1);
    auto opts = mean.options();
    // an output not asked for still gets a buffer when the elementwise pass runs (it
    // writes dx and dresidual together)
    Tensor dx = apply ? new_output(r, x) : Tensor();
    Tensor dres = apply && (res.defined() || mask.defined()) ? new_output(r, x) : Tensor();
    Tensor sum_dz = at::zeros({c}, opts), sum_dzx = at::zeros({c}, opts);
    Tensor scratch = at::empty({r.scratch_bytes}, x.options().dtype(at::kByte));
    run(r, {address(dy), address(x), address(dx), address(mean), address(invstd), address(w),
            address(sum_dz), address(sum_dzx), address(b), address(res), address(dres),
            address(scratch), address(mask), 0});
    if (ndx) out[0] = dx;
    if (ndw) out[1] = sum_dzx;
    if (ndb) out[2] = sum_dz;
    if (ndr) out[5] = dres;
    return out;
  }
};

}  // namespace

// ---- Python bindings ----------------------------------------------------------------------

int64_t add_recipe(int64_t entry, std::vector<int64_t> templ, std::vector<int64_t> patches,
                   std::vector<int64_t> phases, int64_t scratch_bytes, bool small,
                   std::vector<int64_t> sizes, std::vector<int64_t> strides,
                   std::vector<int64_t> out_strides, const std::string& dtype, int64_t backward,
                   int64_t mask_bytes) {
  TORCH_CHECK(patches.size() % 3 == 0 && phases.size() % 3 == 0, "bad recipe");
  auto r = std::make_unique<Recipe>();
  r->entry = reinterpret_cast<entry_fn>(entry);
  r->templ = std::move(templ);
  for (size_t i = 0; i < patches.size(); i += 3) {
    TORCH_CHECK(patches[i] >= 0 && patches[i] < (int64_t)r->templ.size() &&
                    patches[i + 1] >= 0 && patches[i + 1] < kSources,
                "bad recipe patch");
    r->patches.push_back({patches[i], patches[i + 1], patches[i + 2]});
  }
  for (size_t i = 0; i < phases.size(); i += 3)
    r->phases.push_back({phases[i], phases[i + 1], phases[i + 2]});
  r->scratch_bytes = std::max<int64_t>(scratch_bytes, 1);
  r->small = small;
  r->sizes = std::move(sizes);
  r->strides = std::move(strides);
  r->out_strides = std::move(out_strides);
  if (dtype == "float32") r->dtype = at::kFloat;
  else if (dtype == "float64") r->dtype = at::kDouble;
  else if (dtype == "float16") r->dtype = at::kHalf;
  else if (dtype == "bfloat16") r->dtype = at::kBFloat16;
  else TORCH_CHECK(false, "batchnorm numba step: no recipe for dtype ", dtype);
  r->backward = backward;
  r->mask_bytes = mask_bytes;
  std::lock_guard<std::mutex> lock(g_add);
  int64_t id = g_count.load();
  if (id >= kMaxRecipes) return -1;  // full: the caller keeps the Python path
  g_recipes[id].store(r.release(), std::memory_order_release);
  g_count.store(id + 1);
  return id;
}

void set_layout(int64_t ctl_next, int64_t ctl_done, int64_t phase, int64_t units) {
  g_ctl_next = ctl_next;
  g_ctl_done = ctl_done;
  g_phase = phase;
  g_units = units;
}

void set_gomp(int64_t address) { g_gomp.store(reinterpret_cast<gomp_fn>(address)); }

void set_double_backward(py::object fn) {
  if (g_double_backward == nullptr) g_double_backward = new py::object();
  *g_double_backward = std::move(fn);
}

void set_double_backward_act(py::object fn) {
  if (g_double_backward_act == nullptr) g_double_backward_act = new py::object();
  *g_double_backward_act = std::move(fn);
}

void set_pool(int64_t limit, bool huge) {
  std::lock_guard<std::mutex> lock(pool().m);
  pool().limit = limit;
  pool().huge = huge;
}

int64_t pool_bytes() {
  std::lock_guard<std::mutex> lock(pool().m);
  return pool().total;
}

void empty_pool() {
  std::lock_guard<std::mutex> lock(pool().m);
  pool().clear();
}

// The training step: y, with the running buffers updated in place; None (an undefined
// tensor) when the arguments are not what recipe ``id`` was made for.
Tensor train(const Tensor& x, const c10::optional<Tensor>& weight,
             const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
             const c10::optional<Tensor>& running_var, int64_t id, double eps, bool has_weight,
             bool has_bias, bool running) {
  const Recipe& r = recipe(id);
  Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  auto acc = acc_of(r.dtype);
  if (!matches(r, x) || !channel_ok(w, has_weight, acc) || !channel_ok(b, has_bias, acc) ||
      !channel_ok(rm, running, acc) || !channel_ok(rv, running, acc))
    return Tensor();
  py::gil_scoped_release nogil;
  return Train::apply(x, weight, bias, running_mean, running_var, id, eps);
}

// BatchNorm + activation (+ residual), training: y (in place: x, written over, with the
// kernels on ``kernel_weight``); None (an undefined tensor) when the arguments are not what
// recipe ``id`` was made for.
Tensor train_act(const Tensor& x, const c10::optional<Tensor>& weight,
                 const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                 const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& residual,
                 int64_t id, double eps, const std::string& activation, double slope,
                 bool has_weight, bool has_bias, bool running, bool has_residual, bool inplace,
                 const c10::optional<Tensor>& kernel_weight) {
  const Recipe& r = recipe(id);
  Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  Tensor res = residual.value_or(Tensor());
  auto acc = acc_of(r.dtype);
  if (!matches(r, x) || !channel_ok(w, has_weight, acc) || !channel_ok(b, has_bias, acc) ||
      !channel_ok(rm, running, acc) || !channel_ok(rv, running, acc) ||
      !residual_ok(res, has_residual, x))
    return Tensor();
  if (inplace && !channel_ok(kernel_weight.value_or(Tensor()), has_weight, acc))
    return Tensor();
  py::gil_scoped_release nogil;
  return TrainAct::apply(x, weight, bias, running_mean, running_var, residual, id, eps,
                         activation, slope, inplace, kernel_weight);
}

// The eval forward (no autograd: the caller takes it only when nothing needs a gradient).
// Plain BatchNorm's recipes, or the fused activation's with an optional residual; in place
// (the activation's in-place recipes, ``weight`` the kernel weight), the output is ``x``,
// written over, with its version bumped as an in-place op's is.
Tensor eval(const Tensor& x, const c10::optional<Tensor>& weight,
            const c10::optional<Tensor>& bias, const Tensor& running_mean,
            const Tensor& running_var, const c10::optional<Tensor>& residual, int64_t id,
            bool has_weight, bool has_bias, bool has_residual, bool inplace) {
  const Recipe& r = recipe(id);
  Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  Tensor res = residual.value_or(Tensor());
  auto acc = acc_of(r.dtype);
  if (!matches(r, x) || !channel_ok(w, has_weight, acc) || !channel_ok(b, has_bias, acc) ||
      !channel_ok(running_mean, true, acc) || !channel_ok(running_var, true, acc) ||
      !residual_ok(res, has_residual, x))
    return Tensor();
  py::gil_scoped_release nogil;
  Tensor y = inplace ? x : new_output(r, x);
  Tensor scratch = at::empty({r.scratch_bytes}, x.options().dtype(at::kByte));
  run(r, {address(x), address(y), address(running_mean), 0, address(w), address(b), 0, 0, 0, 0,
          address(res), address(scratch), address(running_var)});
  if (inplace) x.unsafeGetTensorImpl()->bump_version();
  return y;
}


// ---- the front door: a whole functional / module call, checks included ---------------------
// The Python layers above the step (argument checks, backend choice, the op layer's tests
// for tracing and transforms) cost 10-20 us a call after another layer's pass has evicted
// the interpreter's code and data from the caches: a tenth of a small layer's eval. front()
// makes the same decisions in C++ for the calls it recognises and runs the step, or returns
// None, and the caller goes the Python way, which raises the errors with their messages.
// So it only accepts: every check of _validation.check_batch_norm_args passed (and for
// batch_norm_act, functional.check_act_args's, in place included: front_inplace_ok), the backend
// resolved to "numba" (by name, or "auto" where "auto" picks it), nothing traced or
// transformed (ops._traced, ops._transformed: the caller has checked torch.compile and
// forward-mode AD), and a recipe the Python path made for such a call before (front_add).
// The GIL guards the table (front_add and front() run holding it).

namespace {

struct FrontKey {
  std::vector<int64_t> geometry;  // sizes, then strides
  at::ScalarType dtype;
  int flags;  // weight, bias, running buffers, training, residual, in place
  double momentum, eps;  // (compared as numbers: -0.0 is 0.0, as in the Python tables)
  int activation;  // index in kActivations; -1: plain BatchNorm
  double slope;
  bool operator<(const FrontKey& o) const {
    return std::tie(geometry, dtype, flags, momentum, eps, activation, slope) <
           std::tie(o.geometry, o.dtype, o.flags, o.momentum, o.eps, o.activation, o.slope);
  }
};

// activations.ACTIVATIONS (the fused activation's names; an index in FrontKey)
const std::array<const char*, 6> kActivations = {"identity", "relu", "leaky_relu", "elu",
                                                 "silu", "gelu"};

int front_activation(PyObject* o) {
  if (!PyUnicode_CheckExact(o)) return -2;
  const char* name = PyUnicode_AsUTF8(o);
  if (name == nullptr) {
    PyErr_Clear();
    return -2;
  }
  for (size_t i = 0; i < kActivations.size(); ++i)
    if (std::strcmp(name, kActivations[i]) == 0) return static_cast<int>(i);
  return -2;
}

struct FrontEntry {
  int64_t recipe;
  bool auto_picks;  // backend "auto" resolves to "numba" for such an input
};

std::map<FrontKey, FrontEntry>& front_table() {
  static auto* t = new std::map<FrontKey, FrontEntry>();
  return *t;
}

int front_flags(bool w, bool b, bool running, bool training, bool residual, bool inplace) {
  return int(w) | int(b) << 1 | int(running) << 2 | int(training) << 3 | int(residual) << 4 |
         int(inplace) << 5;
}

// activations.INPLACE_MIN_ABS_WEIGHT
constexpr double kInplaceMinAbsWeight = 1e-6;

// A Python number as the checks take it: an int (not a bool) or a float, exactly.
bool front_number(PyObject* o, double* out) {
  if (PyFloat_CheckExact(o)) {
    *out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    *out = static_cast<double>(v);
    return true;
  }
  return false;
}

bool front_plain(const Tensor& t) {
  // a dense CPU tensor outside every torch.func transform (ops._transformed)
  constexpr auto kWrapped = c10::DispatchKeySet({c10::DispatchKey::FuncTorchGradWrapper,
                                                 c10::DispatchKey::FuncTorchBatched,
                                                 c10::DispatchKey::Functionalize});
  return t.layout() == at::kStrided && t.device().is_cpu() && !t.key_set().has_any(kWrapped);
}

// None, or an exact Tensor / Parameter (*t set); false for anything else.
bool front_tensor(PyObject* o, const Tensor** t) {
  if (o == Py_None) {
    *t = nullptr;
    return true;
  }
  if (!THPVariable_CheckExact(o)) return false;
  *t = &THPVariable_Unpack(reinterpret_cast<THPVariable*>(o));
  return front_plain(**t);
}

// A per-channel tensor the checks accept and the kernels read in place.
bool front_channel(const Tensor* t, int64_t c, at::ScalarType acc) {
  return t == nullptr || (t->dim() == 1 && t->size(0) == c && channel_ok(*t, true, acc));
}

// Register recipe ``id`` (training or eval; plain BatchNorm's with ``activation`` "", or the
// fused activation's, out of place or ``inplace``) for front().
void front_add(int64_t id, bool training, bool has_weight, bool has_bias, bool running,
               double momentum, double eps, const std::string& activation, double slope,
               bool has_residual, bool inplace, bool auto_picks) {
  const Recipe& r = recipe(id);
  std::vector<int64_t> geometry = r.sizes;
  geometry.insert(geometry.end(), r.strides.begin(), r.strides.end());
  int act = -1;
  if (!activation.empty()) {
    act = front_activation(py::str(activation).ptr());
    TORCH_CHECK(act >= 0, "batchnorm numba step: no activation ", activation);
  }
  front_table()[FrontKey{std::move(geometry), r.dtype,
                         front_flags(has_weight, has_bias, running, training, has_residual,
                                     inplace),
                         training ? momentum : 0.0, eps, act, act < 0 ? 0.0 : slope}] =
      FrontEntry{id, auto_picks};
}

void front_clear() { front_table().clear(); }

// Whether an in-place call (``act`` an index in kActivations) may write over x as the Python
// path would (functional.check_act_args): an invertible activation, and x an intermediate
// tensor with its own memory that the residual does not share, not an inference tensor
// outside inference mode. Anything that check raises for, or that it looks at more closely
// (any view), is declined.
bool front_inplace_ok(const Tensor& x, const Tensor* res, int act, double slope) {
  // activations.INVERTIBLE: identity, elu, leaky_relu with a positive slope (kActivations)
  if (!(act == 0 || act == 3 || (act == 2 && slope > 0.0))) return false;
  if ((x.is_leaf() && x.requires_grad()) || x.is_view() || x.numel() == 0 ||
      (x.is_inference() && !c10::InferenceMode::is_enabled()))
    return false;
  int64_t span = 1;  // elements from the first to one past the last
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (x.stride(i) == 0 && x.size(i) > 1) return false;  // expanded
    span += (x.size(i) - 1) * x.stride(i);
  }
  if (res != nullptr && res->numel() > 0) {
    // same sizes and strides (residual_ok): the byte ranges overlap iff the starts are
    // closer than one range's length
    auto a = reinterpret_cast<intptr_t>(x.data_ptr());
    auto r = reinterpret_cast<intptr_t>(res->data_ptr());
    if ((a > r ? a - r : r - a) < span * static_cast<intptr_t>(x.element_size())) return false;
  }
  return true;
}

// activations.invertible_weight: |gamma| kept at 1e-6 or more (sign kept, 0 -> +1e-6), NaN
// kept; w is a contiguous float32 or float64 CPU tensor (channel_ok).
Tensor invertible_weight(const Tensor& w) {
  Tensor out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "invertible_weight", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t floor = static_cast<scalar_t>(kInplaceMinAbsWeight);
    for (int64_t i = 0; i < w.numel(); ++i) {
      scalar_t v = src[i];
      dst[i] = std::abs(v) < floor ? (v < 0 ? -floor : floor) : v;
    }
  });
  return out;
}

// The call batchnorm.batch_norm(x, running_mean, running_var, weight, bias, training,
// momentum, eps) makes, when front() takes it: y (the running buffers updated in training);
// else None. ``mode``: 1 for the backend "numba", 2 for "auto". A module's call also gives
// ``rank`` (the input's spatial rank it takes: -1 any, 1 for 2-D or 3-D input) and
// ``channels`` (num_features; -1: not checked), and ``counter`` (num_batches_tracked, or
// None), ticked once every check has passed, before the kernels run, as _prepare does.
// batch_norm_act's call also gives the activation's name and slope, the residual and
// ``inplace`` (a bool; True: see front_inplace_ok); a plain BatchNorm call gives None for all
// four.
py::object front(py::handle px, py::handle prm, py::handle prv, py::handle pw, py::handle pb,
                 py::handle ptraining, py::handle pmomentum, py::handle peps, int64_t mode,
                 py::handle pcounter, int64_t rank, int64_t channels, py::handle presidual,
                 py::handle pactivation, py::handle pslope, py::handle pinplace) {
  py::object none = py::none();
  const Tensor *x, *rm, *rv, *w, *b, *counter, *res;
  if (!front_tensor(px.ptr(), &x) || x == nullptr || !front_tensor(prm.ptr(), &rm) ||
      !front_tensor(prv.ptr(), &rv) || !front_tensor(pw.ptr(), &w) ||
      !front_tensor(pb.ptr(), &b) || !front_tensor(pcounter.ptr(), &counter) ||
      !front_tensor(presidual.ptr(), &res))
    return none;
  int act = -1;
  double slope = 0.0;
  bool inplace = false;
  if (pactivation.ptr() != Py_None) {
    act = front_activation(pactivation.ptr());
    if (act < 0 || (pinplace.ptr() != Py_False && pinplace.ptr() != Py_True) ||
        !front_number(pslope.ptr(), &slope) || !std::isfinite(slope))
      return none;
    inplace = pinplace.ptr() == Py_True;
  } else if (res != nullptr || pinplace.ptr() != Py_None) {
    return none;
  }
  if (res != nullptr && !residual_ok(*res, true, *x)) return none;
  if (inplace && !front_inplace_ok(*x, res, act, slope)) return none;
  if (ptraining.ptr() != Py_True && ptraining.ptr() != Py_False) return none;
  bool training = ptraining.ptr() == Py_True;
  double momentum, eps;
  if (!front_number(pmomentum.ptr(), &momentum) || !front_number(peps.ptr(), &eps) ||
      !(momentum >= 0.0 && momentum <= 1.0) || !std::isfinite(eps) ||
      !(training ? eps > 0.0 : eps >= 0.0))
    return none;
  int64_t d = x->dim();
  if (d < 2 || (rank == 1 && d > 3) || (rank > 1 && d != rank + 2)) return none;
  int64_t c = x->size(1);
  if (channels >= 0 && c != channels) return none;
  if ((rm == nullptr) != (rv == nullptr) || (!training && rm == nullptr)) return none;
  at::ScalarType acc = acc_of(x->scalar_type());
  if (!front_channel(rm, c, acc) || !front_channel(rv, c, acc) || !front_channel(w, c, acc) ||
      !front_channel(b, c, acc))
    return none;
  if (training && x->numel() <= c) return none;  // one value per channel (or none)
  if (torch::jit::tracer::isTracing()) return none;
  if (!training && at::GradMode::is_enabled() &&
      (x->requires_grad() || (w != nullptr && w->requires_grad()) ||
       (b != nullptr && b->requires_grad()) || (res != nullptr && res->requires_grad())))
    return none;  // eval with a gradient: the op layer's autograd.Function
  std::vector<int64_t> geometry(x->sizes().begin(), x->sizes().end());
  geometry.insert(geometry.end(), x->strides().begin(), x->strides().end());
  auto& table = front_table();
  auto it = table.find(FrontKey{std::move(geometry), x->scalar_type(),
                                front_flags(w != nullptr, b != nullptr, rm != nullptr, training,
                                            res != nullptr, inplace),
                                training ? momentum : 0.0, eps, act, act < 0 ? 0.0 : slope});
  if (it == table.end() || (mode == 2 && !it->second.auto_picks) || (mode != 1 && mode != 2))
    return none;
  int64_t id = it->second.recipe;
  auto opt = [](const Tensor* t) { return t ? c10::optional<Tensor>(*t) : c10::nullopt; };
  // in place, the kernels read the weight kept invertible
  c10::optional<Tensor> kernel_w;
  if (inplace && w != nullptr) kernel_w = invertible_weight(*w);
  Tensor y;
  if (training) {
    if (counter != nullptr) counter->add_(1);
    if (act < 0)
      y = train(*x, opt(w), opt(b), opt(rm), opt(rv), id, eps, w != nullptr, b != nullptr,
                rm != nullptr);
    else
      y = train_act(*x, opt(w), opt(b), opt(rm), opt(rv), opt(res), id, eps, kActivations[act],
                    slope, w != nullptr, b != nullptr, rm != nullptr, res != nullptr, inplace,
                    kernel_w);
  } else {
    y = eval(*x, inplace ? kernel_w : opt(w), opt(b), *rm, *rv, opt(res), id, w != nullptr,
             b != nullptr, res != nullptr, inplace);
  }
  TORCH_CHECK(y.defined(), "batchnorm numba step: front() took a call its recipe does not");
  return py::cast(y);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_recipe", &add_recipe);
  m.def("set_layout", &set_layout);
  m.def("set_gomp", &set_gomp);
  m.def("set_double_backward", &set_double_backward);
  m.def("set_double_backward_act", &set_double_backward_act);
  m.def("set_pool", &set_pool);
  m.def("pool_bytes", &pool_bytes);
  m.def("empty_pool", &empty_pool);
  m.def("train", &train);
  m.def("train_act", &train_act);
  m.def("eval", &eval);
  m.def("front_add", &front_add);
  m.def("front", &front);
  m.def("front_clear", &front_clear);
}
