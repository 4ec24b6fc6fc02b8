#include "hvp.hpp"

#include "activations.hpp"
#include "losses.hpp"
#include "softmax.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace wsb {

namespace {

// Per-worker storage for one block; layers 1..L as in docs/design.md (index 0 of the
// per-layer vectors is a_0 = x for A and unused otherwise).
struct Scratch {
    RowMat Xb, Yb;
    std::vector<RowMat> A;   // A[l]: a_l, (B, d_l), l = 0..L-1
    std::vector<RowMat> S1;  // sigma'(z_l), l = 1..L-1
    std::vector<RowMat> S2;  // sigma''(z_l), l = 1..L-1
    std::vector<RowMat> D;   // delta_l = dloss/dz_l, l = 1..L
    std::vector<RowMat> G;   // g_l = delta_{l+1} W_{l+1} (so delta_l = sigma'_l * g_l), l = 1..L-1
    std::vector<RowMat> RZ;  // R{z_l}, l = 1..L
    std::vector<RowMat> RA;  // R{a_l}, l = 1..L-1
    std::vector<RowMat> RD;  // R{delta_l}, l = 1..L
    RowMat P, T;             // softmax(z_L) (cross-entropy); a temporary
    RowMat h;                // diagonal losses: A = diag(h) per sample (docs/numerics.md section 5)
    Vec w;                   // label row sums (1 up to rounding)
    std::vector<int> ref;    // reference class r = argmax z_L per sample (docs/numerics.md section 1)
};

std::vector<Index> layer_offsets(const Model& model) {
    std::vector<Index> off(static_cast<size_t>(model.n_layers() + 1), 0);
    for (Index l = 0; l < model.n_layers(); ++l) {
        const auto& W = model.W[static_cast<size_t>(l)];
        off[static_cast<size_t>(l + 1)] =
            off[static_cast<size_t>(l)] + W.size() + (model.has_bias[static_cast<size_t>(l)] ? W.rows() : 0);
    }
    return off;
}

// Forward and first-order backward pass of one block (everything that does not depend on v).
void forward_backward(const Model& model, Loss loss, Scratch& s) {
    const Index L = model.n_layers(), B = s.Xb.rows();
    const auto Ls = static_cast<size_t>(L);
    s.A.resize(Ls);
    s.S1.resize(Ls + 1);
    s.S2.resize(Ls + 1);
    s.D.resize(Ls + 1);
    s.G.resize(Ls + 1);
    s.RZ.resize(Ls + 1);
    s.RA.resize(Ls + 1);
    s.RD.resize(Ls + 1);
    s.A[0] = s.Xb;
    RowMat Z;
    for (Index l = 1; l <= L; ++l) {
        const auto li = static_cast<size_t>(l - 1);
        Z.noalias() = s.A[li] * model.W[li].transpose();
        if (model.has_bias[li]) Z.rowwise() += model.b[li].transpose();
        if (l == L) break;
        const auto lz = static_cast<size_t>(l);
        RowMat& a = s.A[lz];
        RowMat& d1 = s.S1[lz];
        RowMat& d2 = s.S2[lz];
        a.resize(B, Z.cols());
        d1.resize(B, Z.cols());
        d2.resize(B, Z.cols());
        const Activation& act = model.act[li];
        for (Index i = 0; i < B; ++i)
            for (Index c = 0; c < Z.cols(); ++c) activate(act, Z(i, c), a(i, c), d1(i, c), d2(i, c));
    }
    // p = softmax(z_L) and delta_L = w p - y in the saturation-stable forms (docs/numerics.md
    // sections 1-2: reference class r, delta_r = -sum_{k != r} delta_k); for the diagonal losses
    // delta_L and h (docs/numerics.md section 5).
    const Index C = Z.cols();
    s.D[Ls].resize(B, C);
    if (diagonal_loss(loss)) {
        s.h.resize(B, C);
        for (Index i = 0; i < B; ++i)
            diagonal_output(loss, Z.row(i).data(), s.Yb.row(i).data(), C, s.D[Ls].row(i).data(), s.h.row(i).data());
    } else {
        s.P.resize(B, C);
        s.ref.resize(static_cast<size_t>(B));
        s.w = s.Yb.rowwise().sum();
        for (Index i = 0; i < B; ++i) {
            double q = 0.0;
            const int r = stable_softmax(Z.row(i).data(), C, s.P.row(i).data(), q);
            s.ref[static_cast<size_t>(i)] = r;
            stable_delta(s.P.row(i).data(), s.Yb.row(i).data(), s.w(i), r, C, s.D[Ls].row(i).data());
        }
    }
    for (Index l = L - 1; l >= 1; --l) {
        const auto lz = static_cast<size_t>(l);
        s.G[lz].noalias() = s.D[lz + 1] * model.W[lz];  // W_{l+1} is model.W[l]
        s.D[lz] = (s.S1[lz].array() * s.G[lz].array()).matrix();
    }
}

// out_j += sum over the block of H_n v (one direction v = V_j, one output row out_j).
void block_direction(const Model& model, const std::vector<Index>& off, bool hessian, Loss loss, const double* v,
                     double* out, Scratch& s) {
    const Index L = model.n_layers();
    const auto Ls = static_cast<size_t>(L);
    // Forward R-propagation: R{z_l} = R{a_{l-1}} W_l^T + a_{l-1} V_l^T + c_l,  R{a_l} = sigma'_l R{z_l}.
    for (Index l = 1; l <= L; ++l) {
        const auto li = static_cast<size_t>(l - 1), lz = static_cast<size_t>(l);
        const RowMat& W = model.W[li];
        const Eigen::Map<const RowMat> Vl(v + off[li], W.rows(), W.cols());
        RowMat& rz = s.RZ[lz];
        rz.noalias() = s.A[li] * Vl.transpose();
        if (l > 1) rz.noalias() += s.RA[li] * W.transpose();
        if (model.has_bias[li]) rz.rowwise() += Eigen::Map<const Vec>(v + off[li] + W.size(), W.rows()).transpose();
        if (l < L) s.RA[lz] = (s.S1[lz].array() * rz.array()).matrix();
    }
    // R{delta_L} = A R{z_L} with A = w (diag p - p p^T), row by row, in the shifted form
    // A x = w p o (xh - xb 1), xh = x - x_r 1, xb = sum_{i != r} p_i xh_i (docs/numerics.md section 2):
    // entry r is -w p_r xb, of size q |x|, not a difference of two O(|x|) numbers.
    // Diagonal losses: R{delta_L} = h o R{z_L}.
    if (diagonal_loss(loss)) {
        s.RD[Ls] = (s.h.array() * s.RZ[Ls].array()).matrix();
    } else {
        const RowMat& x = s.RZ[Ls];
        const Index C = x.cols();
        RowMat& out = s.RD[Ls];
        out.resize(x.rows(), C);
        for (Index i = 0; i < x.rows(); ++i) {
            const int r = s.ref[static_cast<size_t>(i)];
            const double* p = s.P.row(i).data();
            const double* xi = x.row(i).data();
            double* oi = out.row(i).data();
            double xb = 0.0;
            for (Index k = 0; k < C; ++k)
                if (k != r) xb += p[k] * (xi[k] - xi[r]);
            const double w = s.w(i);
            for (Index k = 0; k < C; ++k) oi[k] = k == r ? -w * p[r] * xb : w * p[k] * ((xi[k] - xi[r]) - xb);
        }
    }
    // Backward: R{delta_l} = sigma'_l (R{delta_{l+1}} W_{l+1} + delta_{l+1} V_{l+1}) + sigma''_l R{z_l} g_l;
    // the GGN keeps only the first product (no sigma'' term, no delta V term).
    for (Index l = L - 1; l >= 1; --l) {
        const auto lz = static_cast<size_t>(l);
        const RowMat& Wn = model.W[lz];
        s.T.noalias() = s.RD[lz + 1] * Wn;
        if (hessian) {
            const Eigen::Map<const RowMat> Vn(v + off[lz], Wn.rows(), Wn.cols());
            s.T.noalias() += s.D[lz + 1] * Vn;
            s.RD[lz] = (s.S1[lz].array() * s.T.array() + s.S2[lz].array() * s.RZ[lz].array() * s.G[lz].array()).matrix();
        } else {
            s.RD[lz] = (s.S1[lz].array() * s.T.array()).matrix();
        }
    }
    // R{grad W_l} = R{delta_l}^T a_{l-1} + delta_l^T R{a_{l-1}} (second term: Hessian only);
    // R{grad b_l} = the column sums of R{delta_l}.
    for (Index l = 1; l <= L; ++l) {
        const auto li = static_cast<size_t>(l - 1), lz = static_cast<size_t>(l);
        const RowMat& W = model.W[li];
        Eigen::Map<RowMat> Ow(out + off[li], W.rows(), W.cols());
        Ow.noalias() += s.RD[lz].transpose() * s.A[li];
        if (hessian && l > 1) Ow.noalias() += s.D[lz].transpose() * s.RA[li];
        if (model.has_bias[li]) Eigen::Map<Vec>(out + off[li] + W.size(), W.rows()) += s.RD[lz].colwise().sum().transpose();
    }
}

// A float64 buffer that starts on a 64-byte boundary.  Eigen's vectorised kernels peel a
// different number of leading elements depending on the address alignment of a Map, which
// changes the rounding; with every buffer aligned the same way, the result depends only on
// the data (not on which buffer or which caller's array it went through).
class AlignedBuffer {
   public:
    explicit AlignedBuffer(size_t n) : raw_(n + 8) {
        const auto addr = reinterpret_cast<std::uintptr_t>(raw_.data());
        data_ = raw_.data() + ((64 - addr % 64) % 64) / sizeof(double);
    }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    AlignedBuffer(AlignedBuffer&&) = default;  // the heap block, hence data_, stays put
    AlignedBuffer& operator=(AlignedBuffer&&) = default;
    double* data() { return data_; }
    const double* data() const { return data_; }

   private:
    std::vector<double> raw_;
    double* data_;
};

}  // namespace

Index n_params(const Model& model) { return layer_offsets(model).back(); }

void hvp(const Model& model, const InputView& X, const Labels& y, const double* V, Index k, double* out,
         const Options& opt, const std::atomic<bool>* cancel) {
    model.validate(opt.loss);
    if (X.rows < 1) throw std::invalid_argument("X: at least one sample is required");
    if (X.cols != model.d(0)) throw std::invalid_argument("X: width does not match layers[0]");
    if ((y.index == nullptr) == (y.soft == nullptr)) throw std::invalid_argument("y: give indices or soft rows");
    if (opt.batch < 1) throw std::invalid_argument("batch_size must be >= 1");
    if (opt.threads < 1) throw std::invalid_argument("threads must be >= 1");
    if (k < 1) throw std::invalid_argument("v: at least one vector is required");

    const std::vector<Index> off = layer_offsets(model);
    const Index P = off.back();
    const Index N = X.rows, B = opt.batch, C = model.d(model.n_layers());
    const Index nb = (N + B - 1) / B;
    const Index slots = std::min<Index>(std::max(opt.threads, 1), nb);
    const auto kP = static_cast<size_t>(k) * static_cast<size_t>(P);

    AlignedBuffer Vcopy(kP);  // the caller's array may sit at any alignment (see AlignedBuffer)
    std::memcpy(Vcopy.data(), static_cast<const void*>(V), kP * sizeof(double));  // V need not be 8-byte aligned
    std::fill(out, out + kP, 0.0);
    std::vector<Scratch> scratch(static_cast<size_t>(slots));
    std::vector<AlignedBuffer> buffers;
    buffers.reserve(static_cast<size_t>(slots));
    for (Index t = 0; t < slots; ++t) buffers.emplace_back(kP);
    for (Index r0 = 0; r0 < nb; r0 += slots) {
        const Index nr = std::min(slots, nb - r0);
        parallel_tasks(nr, opt.threads, cancel, [&](Index t, int worker) {
            const Index blk = r0 + t;
            const Index lo = blk * B, hi = std::min(lo + B, N);
            Scratch& s = scratch[static_cast<size_t>(worker)];
            X.gather(lo, hi, s.Xb);
            y.gather(lo, hi, C, s.Yb);
            forward_backward(model, opt.loss, s);
            double* buf = buffers[static_cast<size_t>(t)].data();
            std::fill(buf, buf + kP, 0.0);
            for (Index j = 0; j < k; ++j) {
                if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) return;  // honoured below
                block_direction(model, off, opt.hessian, opt.loss, Vcopy.data() + static_cast<size_t>(j) * static_cast<size_t>(P),
                                buf + static_cast<size_t>(j) * static_cast<size_t>(P), s);
            }
        });
        // Fixed order: block by block, whatever the number of threads.
        for (Index t = 0; t < nr; ++t) {
            const double* b = buffers[static_cast<size_t>(t)].data();
            for (size_t q = 0; q < kP; ++q) out[q] += b[q];
        }
    }
}

}  // namespace wsb
