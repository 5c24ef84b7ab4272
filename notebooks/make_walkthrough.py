"""Build and execute ``notebooks/walkthrough.ipynb``: questions Q1-Q6 of ``docs/theory.md`` with chainprod.

    python notebooks/make_walkthrough.py              # build, execute, save (about a minute)
    python notebooks/make_walkthrough.py --quick      # small sizes, no Ray (what the test runs)
    python notebooks/make_walkthrough.py --no-execute # write the cells only

Every number in the notebook is computed when it runs: nothing below is a
result, only code and explanations. Figures are stored once, inline in the
notebook, as small PNGs (about 80 dpi); nothing is written next to it (each
``chainprod.plots`` figure is drawn into a temporary directory, read back and
shrunk).

Needs ``nbformat``, ``nbclient`` and ``ipykernel`` (plus ``matplotlib``;
``ray`` and ``torch`` are optional: their cells are skipped without them).
"""

# The notebook's markdown (LaTeX, tables) is kept one line per paragraph row:
# ruff: noqa: E501
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOTEBOOK = os.path.join(HERE, "walkthrough.ipynb")


def _params(quick: bool, ray: bool) -> str:
    return (
        "# Parameters (make_walkthrough.py writes this cell; --quick shrinks every size)\n"
        f"QUICK = {quick!r}\n"
        f"RUN_RAY = {ray!r}  # the Ray cell also needs `import ray` to work\n"
    )


SETUP = r'''
import glob, io, math, os, platform, statistics, sys, tempfile, time
from functools import reduce

import numpy as np
from IPython.display import Image, display

import chainprod as cp
from chainprod import cost, plots

T_START = time.perf_counter()
rng = np.random.default_rng(0)


def best_of(fn, reps=5):
    """(min, median) wall seconds of `reps` calls of fn()."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def show(draw, dpi=80):
    """Display a chainprod.plots figure inline, stored once and small.

    `draw(stem)` writes the figure (PNG, and SVG) under a temporary stem; the
    PNG is read back, scaled to `dpi`, reduced to a 256-colour palette and
    displayed; the files are deleted with the directory.
    """
    from PIL import Image as PILImage

    with tempfile.TemporaryDirectory() as tmp:
        draw(os.path.join(tmp, "figure"))
        png = sorted(glob.glob(os.path.join(tmp, "*.png")))[0]
        with PILImage.open(png) as im:
            scale = dpi / float(im.info.get("dpi", (dpi, dpi))[0])
            im = im.convert("RGB")
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), PILImage.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.quantize(256).save(buf, format="PNG", optimize=True)
    display(Image(data=buf.getvalue(), format="png"))


def table(rows, cols):
    """Print a list of dicts as an aligned text table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    wid = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, wid)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, wid)))


MODEL = cost.load_model()
MACHINE = (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
           f"Python {platform.python_version()}, numpy {np.__version__}")
print("machine      :", MACHINE)
print("platform     :", platform.platform())
print("load average :", ", ".join(f"{x:.2f}" for x in os.getloadavg()), "(1, 5, 15 min; shared machines vary)")
print("chainprod    :", cp.__version__, "| cost model:", MODEL.source)
print("QUICK        :", QUICK)
'''


INTRO = r"""
# chainprod walkthrough: parallel automatic differentiation (Q1–Q6)

This notebook answers the six questions of `docs/theory.md` (the cost of backprop, the gradient as a
chain product, a product tree, a tree per layer and its workers, the shared prefix scan) with
`chainprod` and **measures** each claim on the machine that executed it. Nothing here is typed in by hand: every table and figure is
computed by the cells below. Regenerate with

```
python notebooks/make_walkthrough.py
```

The model is a sequential network $g^{(l)} = f^{(l)}(g^{(l-1)}, \theta^{(l)})$, $g^{(0)} = x$,
widths $d^{(l)} = w$ for $1 \le l < L$ and $d^{(L)} = 1$. Write

* $A_l = \partial_x f^{(l)}(g^{(l-1)}, \theta^{(l)}) \in \mathbb{R}^{d^{(l)} \times d^{(l-1)}}$ (input Jacobian),
* $B_l = \partial_\theta f^{(l)}(g^{(l-1)}, \theta^{(l)}) \in \mathbb{R}^{d^{(l)} \times p^{(l)}}$ (parameter Jacobian).

Timings are wall-clock minima (and medians) over a few repeats. The machine line below says where
they were taken; on a shared machine single timings can move by 2× between runs, so read ratios,
not digits.
"""


SETUP_MD = r"""
## Setup

`QUICK = True` (used by the test suite) shrinks every size so the whole notebook runs in seconds.
"""


Q1_MD = r"""
## Q1 — the cost of backpropagation

Backprop runs the forward pass once (storing $g^{(l)}$), then carries the row vector
$v_l = \partial g^{(L)} / \partial g^{(l)}$ from the output back to the input:

$$v_L = 1, \qquad v_{l-1} = v_l A_l, \qquad \frac{\partial g^{(L)}}{\partial \theta^{(l)}} = v_l B_l .$$

Each step is a vector–matrix product ($1 \times w$ times $w \times w$: $O(w^2)$), and $v_l B_l$ for a
dense layer is an outer product $\delta_l\, g^{(l-1)\top}$, also $O(w^2)$ (never form $B_l$, which is
$w \times w^2$). So

$$T_{\text{backprop}} = O(L\, w^2) \text{ per sample } \big(O(N L w^2) \text{ for a batch of } N\big),\qquad \text{memory } O(Lw),$$

the same order as the forward pass — but the $L$ steps are **dependent**: more workers do not help.
Below: `chainprod.backward(tape, cotangent, method="backprop")` (the backward pass alone) for growing
$L$; the fitted exponent of $T \propto L^{\alpha}$ should be close to 1.
"""

Q1_CODE = r'''
Ls = [64, 128, 256] if QUICK else [256, 512, 1024, 2048, 4096]
ws = [8] if QUICK else [8, 32, 64]
rows = []
for w in ws:
    for L in Ls:
        chain = cp.mlp([w] + [w] * (L - 1) + [1], activation="tanh", seed=1)
        tape = cp.forward(chain, rng.standard_normal((1, w)))
        cotangent = np.ones_like(tape.out)  # d(sum of outputs)/d(output)
        tmin, tmed = best_of(lambda: cp.backward(tape, cotangent, method="backprop"), reps=3 if QUICK else 5)
        rows.append({"w": w, "L": L, "backward_ms": tmin * 1e3, "median_ms": tmed * 1e3,
                     "us_per_layer": tmin / L * 1e6})
table(rows, ["w", "L", "backward_ms", "median_ms", "us_per_layer"])
Q1_SLOPES = {}
for w in ws:
    r = [x for x in rows if x["w"] == w]
    Lw, T = np.array([x["L"] for x in r], float), np.array([x["backward_ms"] for x in r])
    Q1_SLOPES[w] = np.polyfit(np.log(Lw), np.log(T), 1)[0]
    per_layer, fixed = np.polyfit(Lw, T, 1)   # T = fixed + L * per_layer
    worst = np.abs(fixed + per_layer * Lw - T).max() / T.max()
    print(f"w={w:4d}: T ~ L^{Q1_SLOPES[w]:.2f} (theory L^1); linear fit T = {fixed:.3f} ms + L x "
          f"{per_layer * 1e3:.2f} us, worst residual {worst:.0%} of the largest time")
'''


Q2_MD = r"""
## Q2 — the gradient as a product of $L - l + 1$ matrices

By the chain rule through $g^{(L)} = f^{(L)}(\cdots f^{(l)}(g^{(l-1)}, \theta^{(l)}) \cdots)$:

$$\frac{\partial g^{(L)}}{\partial \theta^{(l)}} \;=\; \underbrace{A_L\, A_{L-1} \cdots A_{l+1}}_{L-l \text{ input Jacobians}}\; B_l
\;\in\; \mathbb{R}^{1 \times p^{(l)}},$$

a product of $L-l+1$ matrices: $A_L$ is $1 \times w$, the $A_k$ in between are $w \times w$ and
$B_l$ is $w \times p^{(l)}$. For a dense layer $f(x, W, b) = \sigma(Wx + b)$ with
$s = \sigma'(Wx + b)$: $A = \operatorname{diag}(s)\, W$ and $B = [\operatorname{diag}(s) \otimes x^\top \mid \operatorname{diag}(s)]$
for $\theta = (\operatorname{vec} W, b)$, $W$ flattened row by row.

Below, every layer's gradient of a small 5-layer model is built **literally** as that product of
explicit numpy matrices and compared with `chainprod.grad` (backprop and a scan) and with central
finite differences (`chainprod.check_grad`).
"""

Q2_CODE = r'''
chain = cp.mlp([3, 4, 4, 4, 4, 1], activation="tanh", seed=2)
L = len(chain)
x = rng.standard_normal(3)

# forward pass by hand: xs[l] = g^{(l)}, s[l] = sigma'(z) of layer l (1-based as in the text)
xs, A, B = [x], {}, {}
for l, layer in enumerate(chain.layers, start=1):
    W, b = layer.params
    z = W @ xs[-1] + b
    s = 1 - np.tanh(z) ** 2 if layer.activation == "tanh" else np.ones_like(z)  # last layer: identity
    A[l] = np.diag(s) @ W                                          # d f_l / d x
    B[l] = np.hstack([np.kron(np.diag(s), xs[-1][None, :]), np.diag(s)])  # d f_l / d (vec W, b)
    xs.append(np.tanh(z) if layer.activation == "tanh" else z)

g_bp = cp.grad(chain, x, method="backprop")
g_sc = cp.grad(chain, x, method="sklansky")
rows = []
for l in range(1, L + 1):
    factors = [A[k] for k in range(L, l, -1)] + [B[l]]            # A_L ... A_{l+1} B_l
    row = reduce(np.matmul, factors)                               # 1 x p_l
    W = chain.layers[l - 1].params[0]
    dW, db = row[0, :W.size].reshape(W.shape), row[0, W.size:]
    err_bp = max(np.abs(dW - g_bp[l - 1][0]).max(), np.abs(db - g_bp[l - 1][1]).max())
    err_sc = max(np.abs(dW - g_sc[l - 1][0]).max(), np.abs(db - g_sc[l - 1][1]).max())
    rows.append({"layer l": l, "matrices": len(factors), "L-l+1": L - l + 1,
                 "shapes": " @ ".join(f"{f.shape[0]}x{f.shape[1]}" for f in factors),
                 "|explicit - backprop|": err_bp, "|explicit - sklansky|": err_sc})
    assert len(factors) == L - l + 1 and err_bp < 1e-12 and err_sc < 1e-12
table(rows, list(rows[0]))
fd = cp.check_grad(chain, x, grads=g_sc)
print("central differences, worst relative error per layer:", np.array2string(fd, precision=1))
assert fd.max() < 1e-6
'''


Q3_MD = r"""
## Q3 — a product of $K$ matrices in $\lceil \log_2 K \rceil$ rounds

Matrix multiplication is associative (not commutative), so adjacent factors can be paired in any
bracketing. A balanced tree multiplies pairs $(M_1M_2), (M_3M_4), \dots$ in parallel, then pairs of
pairs, and so on: after round $r$ each partial product covers $2^r$ factors, so $\lceil \log_2 K \rceil$
rounds suffice (an odd factor out waits one round).

* **work**: every product reduces the number of factors by one, so $K-1$ products —
  $O(K w^3)$ flops for $w \times w$ matrices, the *same* as the sequential left-to-right product;
* **time**: $\lceil \log_2 K \rceil \cdot T_{mm}(w) = O(w^3 \log K)$ with enough workers;
* **workers**: the first round has $\lfloor K/2 \rfloor$ independent products, the most of any round.

`chainprod.schedule("tree", K)` is exactly this plan, as pure data; `chainprod.product` runs it.
"""

Q3_CODE = r'''
w = 16
print(cp.schedule("tree", 8).describe(blocks=[("dense", w, w)] * 8))
print()
# the three claims, for every K up to 1000 (plans are built from sizes alone, no arrays)
Ks = range(2, 1001)
for K in Ks:
    s = cp.schedule("tree", K)
    assert (s.rounds, s.peak_width, s.num_ops) == (math.ceil(math.log2(K)), K // 2, K - 1), K
print(f"for K = 2..{Ks[-1]}: rounds == ceil(log2 K), peak width == floor(K/2), ops == K-1  (all hold)")
table([{"K": K, "rounds": cp.schedule("tree", K).rounds, "ceil(log2 K)": math.ceil(math.log2(K)),
        "workers (peak width)": cp.schedule("tree", K).peak_width, "ops": cp.schedule("tree", K).num_ops}
       for K in (2, 3, 8, 100, 1000)], ["K", "rounds", "ceil(log2 K)", "workers (peak width)", "ops"])

# run it: K random orthogonal 8x8 matrices (so the product neither explodes nor vanishes)
K, w = (200, 8) if QUICK else (2000, 8)
mats = [np.linalg.qr(rng.standard_normal((w, w)))[0] for _ in range(K)]
ref = reduce(lambda acc, m: m @ acc, mats)       # mats[K-1] @ ... @ mats[0], left to right
P_tree = cp.product(mats, method="tree")
print(f"\nK={K}, w={w}: max |tree product - sequential numpy product| = {np.abs(P_tree - ref).max():.2e}")
for m in ("tree", "sequential"):
    tmin, _ = best_of(lambda: cp.product(mats, method=m), reps=3)
    s = cp.schedule(m, K)
    print(f"  product(method={m!r:12}) rounds={s.rounds:5d} ops={s.num_ops:5d}  {tmin * 1e3:7.2f} ms "
          "(vectorized backend: one batched numpy call per round)")
'''


Q45_MD = r"""
## Q4 — every gradient in $\lceil \log_2 (L-l+1) \rceil$ rounds; Q5 — how many workers

**Algorithm (Q4).** For each layer $l$, compute $A_L A_{L-1}\cdots A_{l+1} B_l$ with the tree of Q3.
In practice one never forms $B_l$: the tree computes $v_l = A_L \cdots A_{l+1}$ ($L-l$ factors,
$\lceil \log_2 (L-l) \rceil$ rounds) and the last multiplication by $B_l$ is the $O(w^2)$
vector–Jacobian product $\delta_l g^{(l-1)\top}$ — one more round, $\lceil \log_2(L-l+1) \rceil$ in all.
Running the trees of all layers side by side gives every gradient in $\lceil \log_2 L \rceil$ rounds.
This is `chainprod.schedule("independent", L)` (one tree per suffix, sharing nothing).

**Complexity.** Tree $l$ does $L-l$ products, so the total work is
$\sum_{l}(L-l) = L(L-1)/2$ matrix products: $O(L^2 w^3)$ flops, against $O(L w^2)$ for backprop
(products containing $A_L$ are thin $1 \times w$ blocks and cost only $O(w^2)$, which does not change
the order).

**When is it faster than backprop?** With enough workers its time is
$\approx \lceil \log_2 L\rceil\, T_{mm}(w)$, against $L\, T_{mv}(w)$ for backprop, so it wins when

$$\frac{L}{\lceil \log_2 L \rceil} \;>\; \frac{T_{mm}(w)}{T_{mv}(w)} \;\approx\; w \ \text{(flop ratio } w^3/w^2\text{)},$$

i.e. for deep, narrow networks — and only if the workers exist and the per-round communication is
cheap compared with $T_{mm}$.

**Workers (Q5).** The first round of tree $l$ has $\lfloor (L-l+1)/2 \rfloor$ products; all trees
at once need $\sum_l \lfloor (L-l+1)/2 \rfloor \approx L^2/4$ workers.
"""

Q45_TABLE = r'''
rows = []
for L in ([4, 8, 16, 32, 64] if QUICK else [4, 8, 16, 32, 64, 128, 256, 512]):
    s = cp.schedule("independent", L).validate()   # symbolic replay: every prefix is produced
    rows.append({"L": L, "rounds": s.rounds, "ceil(log2 L)": math.ceil(math.log2(L)),
                 "workers (peak width)": s.peak_width, "L^2/4": L * L / 4,
                 "ops (work)": s.num_ops, "L(L-1)/2": L * (L - 1) // 2,
                 "backprop ops": cp.schedule("sequential", L).num_ops})
    assert s.rounds == math.ceil(math.log2(L)) and s.num_ops == L * (L - 1) // 2
table(rows, list(rows[0]))
'''

Q4_THEORY_MD = r"""
### When does it pay? Measured $T_{mm}/T_{mv}$, and the cost model

The first table measures, on this machine, the time of one $w \times w$ matrix–matrix product and
one $1 \times w$ vector–matrix product (averaged over a batched numpy call, as chainprod's
vectorized executor runs them) and the smallest depth $L = 2^k$ with
$L/\lceil\log_2 L\rceil > T_{mm}/T_{mv}$: the crossover of Q4's rule *if* there were enough workers
and no latency at all. The second uses chainprod's cost model (`cost.crossover`,
`cost.simulate`), which also charges per-layer work around the scan, an overhead per backprop
step and each backend's per-round/per-task latencies (defaults, or the file written by
`chainprod calibrate`). The rule counts only the two product kernels; the model also charges
backprop a per-layer overhead (which can exceed $T_{mv}$ at small $w$), which moves the
latency-free crossover down, and charges every round and task of a real backend a latency, which
moves the Ray and threads crossovers up.
"""

Q4_THEORY = r'''
def crossover_rule(ratio, max_k=40):
    return next((2 ** k for k in range(1, max_k) if 2 ** k / k > ratio), None)

rows = []
for w in ([8, 32] if QUICK else [8, 16, 32, 64, 128]):
    n = max(8, 2 ** 17 // (w * w))
    X, Y = rng.standard_normal((n, w, w)), rng.standard_normal((n, w, w))
    v, O, o = rng.standard_normal((n, 1, w)), np.empty((n, w, w)), np.empty((n, 1, w))
    t_mm = best_of(lambda: np.matmul(X, Y, out=O))[0] / n
    t_mv = best_of(lambda: np.matmul(v, Y, out=o))[0] / n
    rows.append({"w": w, "T_mm (us)": t_mm * 1e6, "T_mv (us)": t_mv * 1e6, "T_mm/T_mv": t_mm / t_mv,
                 "rule L*": crossover_rule(t_mm / t_mv),
                 "model L*: ideal, P=inf": cost.crossover(w, 2 ** 20, backend="ideal"),
                 "model L*: ray, P=64": cost.crossover(w, 64, backend="ray"),
                 "model L*: threads, P=2": cost.crossover(w, 2, backend="threads")})
table(rows, list(rows[0]))
print("(None = no crossover up to L = 2^20)")
'''

Q4_SIM_MD = r"""
The simulator answers Q4 for many more workers than this machine has: the predicted speedup of the
best scan's backward pass over backprop, for a dense chain of width 8, by depth and worker count,
with no communication latency (`backend="ideal"`) — an upper bound. Each curve flattens once $L/2$
exceeds $P$: beyond that, rounds are cut into $P$ shares and the time grows like $L/P$ again. The
$P=1$ curve is not parallelism: the model charges backprop a fixed overhead per layer step, which
the batched rounds of a scan avoid.
"""

Q4_SIM = r'''
sim = [cost.simulate(2 ** k, 8, P, backend="ideal") for P in (1, 2, 16, 256, 4096) for k in range(3, 21)]
show(lambda stem: plots.simulation(sim, stem, machine=MACHINE))
best = max(sim, key=lambda r: r["speedup"])
print(f"largest predicted speedup: {best['speedup']:.0f}x at L={best['L']}, P={best['workers']} "
      f"({best['schedule']}, {best['rounds']} rounds)")
'''

Q4_MEASURED_MD = r"""
On the one core of the vectorized backend the $L^2/2$ work of `independent` is all paid serially:
the same depth as a shared scan (Q6) but quadratically more work.
"""

Q4_MEASURED = r'''
rows = []
for L in ([32, 64] if QUICK else [64, 256]):
    chain = cp.mlp([8] + [8] * (L - 1) + [1], seed=3)
    tape = cp.forward(chain, rng.standard_normal((1, 8)))
    cotangent = np.ones_like(tape.out)
    ref = cp.backward(tape, cotangent, method="backprop")
    for m in ("backprop", "independent", "sklansky"):
        g = cp.backward(tape, cotangent, method=m)
        assert all(np.allclose(a, b) for ga, gb in zip(g, ref) for a, b in zip(ga, gb))
        tmin, _ = best_of(lambda: cp.backward(tape, cotangent, method=m), reps=3)
        s = cp.schedule("sequential" if m == "backprop" else m, L - 1)
        rows.append({"L": L, "w": 8, "method": m, "rounds": s.rounds, "ops": s.num_ops,
                     "backward_ms": tmin * 1e3})
table(rows, list(rows[0]))
'''


Q6_MD = r"""
## Q6 — share the products: a prefix scan with linear workers and $O(\log L)$ time

The products of Q4 overlap: $v_l = A_L \cdots A_{l+1}$ and $v_{l-1} = v_l A_l$ share all but one
factor. Reversing the list, $a_1 = A_L,\ a_2 = A_{L-1}, \dots$, the vectors $v_l$ are exactly the
**prefix products** $a_1,\ a_1a_2,\ a_1a_2a_3, \dots$ of one sequence under the associative
operation $\otimes = $ matrix product — a *parallel prefix scan*. Every interval product
$[i, j] = a_i \cdots a_j$ can be computed once and reused by every prefix that contains it.

* **Sklansky** (Ladner–Fischer): in round $r$ every block of $2^{r}$ consecutive prefixes is finished by
  combining its left half's last prefix with each element of its right half:
  $\lceil\log_2 L\rceil$ rounds, $L/2$ ops per round (**$L/2$ workers**), work $\frac{L}{2}\log_2 L$.
* **Brent–Kung** (Blelloch): a tree up-sweep of partial products, then a down-sweep that fills in
  the missing prefixes: $\le 2\lceil\log_2 L\rceil - 1$ rounds, $L/2$ workers, **work $< 2L$** (as
  much as a product tree plus one pass) — work-efficient.
* **Chunked** (reduce-then-scan, $P$ workers): each worker folds its chunk of $L/P$ matrices, the $P$
  chunk totals are scanned in $\log_2 P$ rounds, each worker finishes its chunk:
  $\approx 2L/P + \log_2 P$ rounds, work $\approx 2L$, $P-1$ workers: the form that suits few workers.

All of them keep the workers **linear** in $L$ (vs $L^2/4$ for Q5) and the depth $O(\log L)$. First,
the reuse itself: in `independent` the same interval products are recomputed by many trees.
"""

Q6_REUSE = r'''
L = 64
s = cp.schedule("independent", L)
computed = [(int(a), int(c)) for i, k, j in s.intervals() for a, c in zip(i, j)]
print(f"independent, L={L}: {len(computed)} products computed, only {len(set(computed))} distinct intervals "
      f"[i, j] among them ({len(computed) / len(set(computed)):.1f}x redundancy)")
sk = cp.schedule("sklansky", L)
distinct = {(int(a), int(c)) for i, k, j in sk.intervals() for a, c in zip(i, j)}
print(f"sklansky,    L={L}: {sk.num_ops} products, {len(distinct)} distinct intervals: each product is "
      "computed once and reused by every prefix that contains it")
'''

Q6_TABLE = r'''
rows = []
for L in ([16, 64, 256] if QUICK else [16, 64, 256, 1024, 4096]):
    lg = math.ceil(math.log2(L))
    for name, opts in (("sklansky", {}), ("brent_kung", {}), ("chunked", {"chunks": 8}),
                       ("hillis_steele", {})):
        s = cp.schedule(name, L, **opts)
        if L <= 1024:
            s.validate()
        rows.append({"L": L, "method": name + (f"(P={opts['chunks']})" if opts else ""),
                     "rounds": s.rounds, "log2 L": lg, "workers": s.peak_width, "L/2": L // 2,
                     "ops": s.num_ops, "ops/L": s.num_ops / L,
                     "independent ops": L * (L - 1) // 2, "independent workers": L * L // 4})
table(rows, list(rows[0]))
print("\nsklansky, L=16, w=8 gradient chain: what each round costs, from the real block shapes")
print(cp.schedule("sklansky", 16).describe(blocks=8, workers=8))
'''

Q6_DIAGRAM_MD = r"""
The two circuits for $L = 16$ (positions across, rounds down; red = the result contains $A_L$, so it
is a thin $1\times w$ block and the op is a cheap vector–matrix product):
"""

Q6_DIAGRAM = r'''
for name in ("sklansky", "brent_kung"):
    show(lambda stem: plots.schedule_diagram(cp.schedule(name, 16), stem))
'''

Q6_MEASURED_MD = r"""
### Measured: `grad` by backprop vs the best scan (vectorized backend, one process)

A moderately deep, narrow dense chain and a diagonal chain (elementwise layers: diagonal Jacobians, a
linear recurrence / state-space model, where products stay $O(w)$ and a scan is work-efficient). The
forward pass is sequential for every method, so it is timed apart (once); the backward pass is timed
per method, and every method's gradients are checked against backprop. On one core a scan cannot win
by parallelism: where it wins, it is because its $O(\log L)$ batched calls cost less than backprop's
$L$ per-layer steps (a numpy loop pays a Python-level overhead per layer, a compiled loop almost
none); where it loses, its extra work (matrix–matrix products) outweighs that. The `model ms`
column is the cost model's prediction; `method="auto"` on the compiled kernels does not trust it alone:
it times the scans that could win against backprop once, keeps the fastest (here: what `auto (-> ...)`
names), and the model stays the tool for machines we do not have (the simulator below).
"""

Q6_MEASURED = r'''
L6 = 512 if QUICK else 4096
cases = [("dense (mlp, tanh)", cp.mlp([8] + [8] * (L6 - 1) + [1], seed=4), 8),
         ("diagonal (linear recurrence)", cp.diagonal_chain(L6 - 1, 32, seed=4), 32)]
SCANS = ("sklansky", "brent_kung", "chunked", "auto")
Q6_RESULTS = []
for label, chain, w in cases:
    x = rng.standard_normal((1, chain.d_in))
    t = time.perf_counter()
    tape = cp.forward(chain, x)
    t_fwd = time.perf_counter() - t
    cotangent = np.ones_like(tape.out)
    ref = cp.backward(tape, cotangent, method="backprop")
    methods = ("backprop",) + SCANS
    for m in methods:  # check every method (this also warms up the cached plans)
        g = cp.backward(tape, cotangent, method=m)
        assert all(np.allclose(a, b, rtol=1e-8, atol=1e-12) for ga, gb in zip(g, ref) for a, b in zip(ga, gb)), m
    # repeats interleaved across methods, so a burst of load on a shared machine hits all of them
    samples = {m: [] for m in methods}
    for _ in range(3 if QUICK else 9):
        for m in methods:
            t = time.perf_counter()
            cp.backward(tape, cotangent, method=m)
            samples[m].append(time.perf_counter() - t)
    times = {m: (min(v), statistics.median(v)) for m, v in samples.items()}
    ran = cp.Trace()
    cp.backward(tape, cotangent, method="auto", trace=ran)  # what auto runs: its measured choice, kept
    ran = ran.schedule if isinstance(ran.schedule, str) else ran.schedule.name
    best = min(SCANS, key=lambda m: times[m][0])
    structure = "dense" if "dense" in label else "diagonal"
    pred = {m: cost.predict_grad(structure, len(chain), w, method=m, batch=1) for m in times}
    print(f"{label}: L={len(chain)} layers, w={w}, batch 1, float64, backend=vectorized; "
          f"forward {t_fwd * 1e3:.1f} ms (model: {pred['backprop']['forward'] * 1e3:.1f} ms)")
    table([{"method": m + (f" (-> {ran})" if m == "auto" else ""),
            "backward min ms": times[m][0] * 1e3, "median ms": times[m][1] * 1e3,
            "model ms": pred[m]["backward"] * 1e3,
            "speedup vs backprop": times["backprop"][0] / times[m][0]} for m in times],
          ["method", "backward min ms", "median ms", "model ms", "speedup vs backprop"])
    r = {"case": label, "L": len(chain), "w": w, "forward_ms": t_fwd * 1e3,
         "backprop_ms": times["backprop"][0] * 1e3,
         "best scan": best + (f" ({ran})" if best == "auto" else ""), "scan_ms": times[best][0] * 1e3,
         "backward speedup": times["backprop"][0] / times[best][0],
         "end-to-end speedup": (t_fwd + times["backprop"][0]) / (t_fwd + times[best][0])}
    Q6_RESULTS.append(r)
    twin = ran
    if twin in times:
        print(f"(auto ran the same plan as {twin}: their minima differ by "
              f"{abs(times['auto'][0] / times[twin][0] - 1):.0%}, a measure of this run's timing noise)")
    print()
print("machine:", MACHINE)
table(Q6_RESULTS, list(Q6_RESULTS[0]))
'''


DIST_MD = r"""
## Distributed: measured rounds and concurrency from a trace

The same plans run on real workers. `return_trace=True` records every task's start, end and
worker, so the rounds and the peak concurrency below are **observed**, not read off the plan, and the
Gantt chart is drawn from those records. First the `threads` backend with 2 workers (one BLAS thread
each), then — if Ray is installed — an embedded local Ray cluster with 2 workers (its start-up, a
few seconds or more, is timed apart).
"""

DIST_THREADS = r'''
L_d = 256 if QUICK else 1024
chain = cp.mlp([8] + [8] * (L_d - 1) + [1], seed=5)
x = rng.standard_normal((1, 8))
ref = cp.grad(chain, x, method="backprop")
g, trace = cp.grad(chain, x, method="sklansky", backend="threads", workers=2, return_trace=True)
assert all(np.allclose(a, b) for ga, gb in zip(g, ref) for a, b in zip(ga, gb))
plan = cp.schedule("sklansky", L_d - 1)
print(f"threads, P=2, sklansky, L={L_d}, w=8: plan {plan.rounds} rounds / peak width {plan.peak_width}; "
      f"measured {trace.rounds} rounds, {trace.num_tasks} tasks, peak concurrency {trace.peak_concurrency()}, "
      f"span {trace.span * 1e3:.2f} ms")
show(lambda stem: plots.gantt(trace, stem, title=f"threads P=2 sklansky L={L_d} w=8", machine=MACHINE))
'''

DIST_RAY = r'''
import importlib.util

if RUN_RAY and importlib.util.find_spec("ray") is not None:
    import logging, warnings

    # in a notebook, ray looks for ipywidgets (tqdm, rich reprs): not needed here, keep it quiet
    logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from chainprod.executors import ray_executor

    L_r = 256
    chain = cp.mlp([8] + [8] * (L_r - 1) + [1], seed=6)
    x = rng.standard_normal((1, 8))
    ref = cp.grad(chain, x, method="backprop")
    t = time.perf_counter()
    cp.grad(chain, x, method="sklansky", backend="ray", workers=2)   # starts the embedded cluster
    t_start = time.perf_counter() - t
    t = time.perf_counter()
    g, trace = cp.grad(chain, x, method="sklansky", backend="ray", workers=2, return_trace=True)
    t_run = time.perf_counter() - t
    assert all(np.allclose(a, b) for ga, gb in zip(g, ref) for a, b in zip(ga, gb))
    t_bp = best_of(lambda: cp.grad(chain, x, method="backprop"), reps=3)[0]
    print(f"ray, P=2, sklansky, L={L_r}, w=8: first call (cluster start + run) {t_start:.1f} s; "
          f"second call {t_run * 1e3:.1f} ms vs backprop grad {t_bp * 1e3:.2f} ms on this machine")
    print(f"measured {trace.rounds} rounds, {trace.num_tasks} tasks on "
          f"{len({e.worker for e in trace.events})} worker process(es), peak concurrency "
          f"{trace.peak_concurrency()}, span {trace.span * 1e3:.1f} ms")
    show(lambda stem: plots.gantt(trace, stem, title=f"ray P=2 sklansky L={L_r} w=8", machine=MACHINE))
    ray_executor.shutdown()
else:
    print("Ray cell skipped:", "RUN_RAY is False" if not RUN_RAY else "ray is not installed")
'''

TORCH_MD = r"""
## A model you already have in torch

A `torch.nn.Sequential` of `nn.Linear` layers with `Tanh`, `ReLU`, `Sigmoid`, `Softplus` or `Identity`
between them is such a chain already. `chainprod.torch` (imported only when asked for, as `cpt` below)
has two entry points: `cpt.from_torch(model)` reads the model into a chainprod `Chain` (`nn.Linear`'s
weight is `(d_out, d_in)`, as `cp.Dense` expects), and
`cpt.torch_backward(model, x, y, loss="mse", method=...)` runs the forward pass, forms the Jacobians'
suffix products with the chosen plan, fills every parameter's `.grad` as `loss.backward()` would, and
returns the loss. Below: the same model's gradients by torch autograd and by a Sklansky scan, and the
largest difference between them.
"""

TORCH_CODE = r'''
import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch

    import chainprod.torch as cpt

    torch.manual_seed(0)
    w_t, L_t = 16, (16 if QUICK else 64)
    layers = []
    for _ in range(L_t - 1):
        layers += [torch.nn.Linear(w_t, w_t), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(w_t, 1)).double()
    xt = torch.randn(32, w_t, dtype=torch.float64)
    yt = torch.randn(32, 1, dtype=torch.float64)

    model.zero_grad()
    loss_ref = torch.nn.functional.mse_loss(model(xt), yt)
    loss_ref.backward()                                   # torch autograd: the reference
    ref = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss = cpt.torch_backward(model, xt, yt, loss="mse", method="sklansky")   # the prefix scan
    diff = max(float((p.grad - r).abs().max()) for p, r in zip(model.parameters(), ref))
    chain = cpt.from_torch(model)
    print(f"torch.nn.Sequential -> cpt.from_torch: {len(chain)} layers, width {w_t}, batch {len(xt)}, float64")
    print(f"loss: torch {loss_ref.item():.12g}, chainprod {float(loss):.12g}")
    print(f"max |p.grad (sklansky scan) - p.grad (loss.backward())| over all {len(ref)} parameters: {diff:.2e}")
    assert diff < 1e-10
else:
    print("torch cell skipped: torch is not installed (pip install torch)")
'''


ARRAY_MD = r"""
## Arrays on devices: torch, JAX and CuPy inputs

The same entry points take torch tensors (CPU or CUDA), JAX arrays and CuPy arrays. They run on the
`"array"` executor (the vectorized executor's rounds, written once against the array API standard) in the
arrays' own library and on their device, and return arrays of that library, dtype and device; numpy
inputs keep the paths above (`docs/devices.md`). Below, on torch CPU tensors (CUDA tensors run the same
code on a GPU): all suffix products of a chain of dense blocks, and every state of a diagonal linear
recurrence, each against the numpy path on the same numbers. A numpy-only backend refuses the tensors
and says which one runs them.
"""

ARRAY_CODE = r'''
import importlib.util

if importlib.util.find_spec("torch") is not None and "array" in cp.valid_backends():
    import torch

    def rel_err(got, want):
        return float(np.abs(got - want).max() / np.abs(want).max())

    L_a, T_a = (64 if QUICK else 256), (1000 if QUICK else 4096)
    mats_np = rng.standard_normal((L_a, 8, 8)) * (0.9 / np.sqrt(8))        # L dense 8 x 8 blocks
    a_np, b_np = rng.uniform(0.5, 1.0, (T_a, 4, 16)), rng.standard_normal((T_a, 4, 16))
    mats_t, a_t, b_t = (torch.from_numpy(v) for v in (mats_np, a_np, b_np))  # the same numbers, as tensors
    ref_p = np.stack(cp.suffix_products(mats_np, method="sequential"))
    ref_h = cp.linear_recurrence(cp.Diag(a_np), b_np, method="sequential")
    array_rows = []
    for method in ("sequential", "sklansky", "brent_kung"):
        out_t = cp.suffix_products(mats_t, method=method)                  # a list of torch tensors
        h_t = cp.linear_recurrence(cp.Diag(a_t), b_t, method=method)       # one torch tensor
        array_rows.append({
            "method": method, "returns": f"{type(h_t).__module__}.{type(h_t).__name__} on {h_t.device}",
            f"products L={L_a}: rel. err vs numpy": rel_err(torch.stack(out_t).numpy(), ref_p),
            f"recurrence T={T_a}: rel. err vs numpy": rel_err(h_t.numpy(), ref_h)})
        assert max(list(array_rows[-1].values())[2:]) < 1e-12
    table(array_rows, list(array_rows[0]))
    try:
        cp.suffix_products(mats_t, backend="threads")
    except TypeError as e:
        print("backend='threads' with torch tensors:", e)
else:
    print("array cell skipped: torch or the array executor is not installed (pip install torch 'chainprod[array]')")
'''


SEQ_MD = r"""
## Sequences: recurrences over time

An RNN run over $T$ steps is a chain of $T$ Jacobians with *shared* weights and an input at every step:
$h_t = f(W_{ih} u_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})$. With a loss term at every step, the adjoints
obey the same kind of recurrence run backwards, $\lambda_{t-1} = J_t^\top \lambda_t + \partial\ell/\partial h_{t-1}$,
so backprop through time is a product of Jacobians like the ones above, and a scan can form it
(`docs/recurrences.md`). `cp.from_torch` reads `nn.RNN`, `nn.GRU` and `nn.LSTM` with torch's parameter
names and gate order; `cp.value_and_grad` takes the model with `loss="sum"` (or `"mse"` against targets)
and returns gradients named like torch's. Below: a GRU's gradients against torch autograd, by compiled
backprop through time and by a Sklansky scan of the state Jacobians, then one gradient's time by
chainprod, torch and (in the full run) JAX, as the `sequences` section of `chainprod bench` measures it.
A scan's ops multiply dense $S\times S$ state Jacobians ($S^3$ flops against backprop's $S^2$ per step),
so the simulator's crossover needs many workers; `chainprod bench --preset sequences` measures the grid.
"""

SEQ_CODE = r'''
if importlib.util.find_spec("torch") is not None:
    from chainprod.bench_sequences import SequenceProblem, crossover_workers, sequence_step

    torch.manual_seed(0)
    gru_t = torch.nn.GRU(4, 8, num_layers=2).double()
    u_t = torch.randn(50, 3, 4, dtype=torch.float64)
    gru_t.zero_grad()
    out_t, _ = gru_t(u_t)
    out_t.sum().backward()                                 # torch autograd: the reference
    gru = cp.from_torch(gru_t)
    for method in ("backprop", "sklansky"):
        value, g = cp.value_and_grad(gru, u_t.numpy(), loss="sum", method=method)
        diff = max(float(np.abs(g[n] - p.grad.numpy()).max()) for n, p in gru_t.named_parameters())
        print(f"GRU (2 layers, T=50, N=3), method={method!r}: loss {value:.12g} (torch {out_t.sum().item():.12g}), "
              f"max |grad - torch's| = {diff:.1e}")
        assert diff < 1e-10

    T_s, H_s, N_s = (200 if QUICK else 1000), 20, 4
    peers = [("backprop", "numba"), ("torch", "torch")] + ([] if QUICK or importlib.util.find_spec("jax") is None
                                                            else [("jax", "jax")])
    seq_rows, threads_before = [], torch.get_num_threads()
    torch.set_num_threads(1)                               # chainprod's loop runs on one thread: so does torch
    for cell in ("rnn_tanh", "gru", "lstm"):
        prob = SequenceProblem(cell, T_s, H_s, N_s, "float64")
        times = {}
        for method, backend in peers:
            step = sequence_step(method, backend, 1, prob)
            step()                                         # compiles (numba's cache, XLA)
            times[method] = best_of(step, reps=3 if QUICK else 5)[1]
        P_x = crossover_workers(cell, T_s, H_s, N_s, times["backprop"])["P"]
        seq_rows.append({"cell": cell, "T": T_s, "H": H_s, "N": N_s,
                         **{f"{m} ms": t * 1e3 for m, t in times.items()},
                         "torch / chainprod": times["torch"] / times["backprop"],
                         "scan wins from P": P_x or f"> {2 ** 16}"})
    torch.set_num_threads(threads_before)
    print("one gradient through time (loss = sum of outputs), median wall time, 1 thread (JAX: its own pool):")
    table(seq_rows, list(seq_rows[0]))
else:
    print("sequences cell skipped: torch is not installed (pip install torch)")
'''


NEWTON_MD = r"""
## Newton forward: the forward pass in log depth too

A log-depth backward pass leaves a training step as deep as its forward pass. DEER writes the whole
trajectory $x_1..x_L$ of $x_l = f_l(x_{l-1})$ as one system of equations and solves it by Newton's method:
each iteration is the *linear* recurrence $x_l = J_l x_{l-1} + (f_l(\bar x_{l-1}) - J_l \bar x_{l-1})$ around
the current guess $\bar x$, one affine scan of $\lceil\log_2 L\rceil$ rounds on the same engine
(`cp.linear_recurrence`). `cp.forward(model, x, method="deer")` (also `"quasi_deer"`: diagonal Jacobians;
`"elk"`, `"quasi_elk"`: damped) returns what the sequential pass returns; `cp.grad(..., forward="deer")`
takes the gradients after it. A contractive model (largest Lyapunov exponent $\lambda < 0$, estimated by
`chainprod.newton.model_lyapunov`) needs a handful of iterations. Each iteration does about
$S\log_2 L$ times the sequential pass's work, so on two cores it is far slower than the compiled
sequential pass (`docs/benchmarks.md` section 12 has iterations, work and the simulator's crossover).
"""

NEWTON_CODE = r'''
from chainprod.newton import model_lyapunov

L_n, w_n = (256 if QUICK else 1024), 8
chain_n = cp.Chain([cp.Dense(0.5 * rng.standard_normal((w_n, w_n)) / np.sqrt(w_n), 0.1 * rng.standard_normal(w_n),
                             "tanh") for _ in range(L_n)] + [cp.Dense(rng.standard_normal((1, w_n)), np.zeros(1))])
x_n = rng.standard_normal((4, w_n))
ref_n = cp.forward(chain_n, x_n)
tape_n, tr_n = cp.forward(chain_n, x_n, method="deer", schedule="sklansky", return_trace=True)
print(f"tanh chain, L={L_n}, w={w_n}, N=4: lambda = {model_lyapunov(chain_n, x_n):+.2f} per layer")
print(f"deer: {tr_n.iterations} iterations of {tr_n.rounds[0]} scan rounds; scaled residual after each:",
      ", ".join(f"{r:.1e}" for r in tr_n.residuals))
print(f"max |deer - sequential| over every layer output: {np.abs(tape_n.flat - ref_n.flat).max():.1e}")
g_seq = cp.grad(chain_n, x_n, method="sklansky")
g_deer, tr_g = cp.grad(chain_n, x_n, method="sklansky", forward="deer",
                       forward_options={"tol": 1e-13, "schedule": "sklansky"},
                       return_trace=True)
print("grads after deer vs after the sequential pass: max |diff| =",
      f"{max(float(np.abs(a - b).max()) for la, lb in zip(g_deer, g_seq) for a, b in zip(la, lb)):.1e};",
      tr_g.note.split("; ")[-1])

rnn_n = cp.RNN(4, 8, seed=0)
u_n = rng.standard_normal(((200 if QUICK else 1000), 2, 4))
(out_n, _), tr_r = cp.forward(rnn_n, u_n, method="deer", return_trace=True)
print(f"RNN, T={len(u_n)}, H=8: deer in {tr_r.iterations} iterations, max |out - sequential| = "
      f"{np.abs(out_n - rnn_n.forward(u_n)[0]).max():.1e}")
newton_rows = []
for name, fn in [("sequential (compiled)", lambda: cp.forward(chain_n, x_n)),
                 ("deer", lambda: cp.forward(chain_n, x_n, method="deer", schedule="sklansky")),
                 ("quasi_deer", lambda: cp.forward(chain_n, x_n, method="quasi_deer", schedule="sklansky"))]:
    fn()
    newton_rows.append({"forward pass of the chain": name, "ms (median of 3)": best_of(fn, reps=3)[1] * 1e3})
table(newton_rows, list(newton_rows[0]))
'''


SUMMARY_MD = r"""
## Summary

| question | answer | chainprod |
|---|---|---|
| Q1 | backprop: $O(Lw^2)$ work in $L$ dependent steps | `method="backprop"` |
| Q2 | $\partial g/\partial\theta^{(l)} = A_L\cdots A_{l+1}B_l$ ($L-l+1$ matrices) | `grad`, `check_grad` |
| Q3 | tree: $\lceil\log_2 K\rceil$ rounds, $K-1$ products ($O(Kw^3)$), $\lfloor K/2\rfloor$ workers | `schedule("tree", K)`, `product` |
| Q4 | a tree per layer: $\lceil\log_2 L\rceil$ rounds, $O(L^2w^3)$ work; wins if $L/\lceil\log_2 L\rceil > T_{mm}/T_{mv}$ | `schedule("independent", L)`, `cost.crossover` |
| Q5 | $\approx L^2/4$ workers | `Schedule.peak_width` |
| Q6 | prefix scan: $O(\log L)$ rounds, $L/2$ (or $P$) workers, $O(L)$–$O(L\log L)$ work | `sklansky`, `brent_kung`, `chunked` |
| torch | an `nn.Sequential` of `nn.Linear` + activations is such a chain: its `.grad` by a scan | `from_torch`, `torch_backward` |
| arrays | torch (CPU, CUDA), JAX and CuPy inputs run in their own library, on their device | `suffix_products`, `linear_recurrence`, `grad` on tensors; `benchmarks/device_check.py` |
| sequences | an RNN/GRU/LSTM over $T$ steps is a chain of $T$ shared-weight Jacobians: BPTT or a reverse scan | `from_torch`, `value_and_grad`, `bench --preset sequences` |
| Newton forward | the forward pass as a few affine scans (DEER, quasi-DEER, ELK): few iterations when contractive | `forward(method="deer")`, `grad(forward="deer")` |

The measured figures of this run:
"""

SUMMARY = r'''
print("machine:", MACHINE)
print("Q1 backprop time ~ L^alpha:", ", ".join(f"w={w}: alpha={a:.2f}" for w, a in Q1_SLOPES.items()))
for r in Q6_RESULTS:
    print(f"Q6 {r['case']}, L={r['L']}, w={r['w']}: backward {r['backprop_ms']:.2f} ms (backprop) vs "
          f"{r['scan_ms']:.2f} ms ({r['best scan']}) = {r['backward speedup']:.2f}x; "
          f"end-to-end {r['end-to-end speedup']:.2f}x")
print(f"notebook executed in {time.perf_counter() - T_START:.1f} s (after kernel start)")
'''


def cells(quick: bool = False, ray: bool = True):
    """The notebook as a list of (kind, source, tags)."""
    return [
        ("markdown", INTRO, []),
        ("markdown", SETUP_MD, []),
        ("code", _params(quick, ray), ["parameters"]),
        ("code", SETUP, []),
        ("markdown", Q1_MD, []),
        ("code", Q1_CODE, []),
        ("markdown", Q2_MD, []),
        ("code", Q2_CODE, []),
        ("markdown", Q3_MD, []),
        ("code", Q3_CODE, []),
        ("markdown", Q45_MD, []),
        ("code", Q45_TABLE, []),
        ("markdown", Q4_THEORY_MD, []),
        ("code", Q4_THEORY, []),
        ("markdown", Q4_SIM_MD, []),
        ("code", Q4_SIM, []),
        ("markdown", Q4_MEASURED_MD, []),
        ("code", Q4_MEASURED, []),
        ("markdown", Q6_MD, []),
        ("code", Q6_REUSE, []),
        ("code", Q6_TABLE, []),
        ("markdown", Q6_DIAGRAM_MD, []),
        ("code", Q6_DIAGRAM, []),
        ("markdown", Q6_MEASURED_MD, []),
        ("code", Q6_MEASURED, []),
        ("markdown", DIST_MD, []),
        ("code", DIST_THREADS, []),
        ("code", DIST_RAY, []),
        ("markdown", TORCH_MD, []),
        ("code", TORCH_CODE, []),
        ("markdown", ARRAY_MD, []),
        ("code", ARRAY_CODE, []),
        ("markdown", SEQ_MD, []),
        ("code", SEQ_CODE, []),
        ("markdown", NEWTON_MD, []),
        ("code", NEWTON_CODE, []),
        ("markdown", SUMMARY_MD, []),
        ("code", SUMMARY, []),
    ]


def build(quick: bool = False, ray: bool = True):
    """An unexecuted ``nbformat`` notebook."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src, tags in cells(quick, ray):
        src = src.strip("\n")
        cell = nbformat.v4.new_code_cell(src) if kind == "code" else nbformat.v4.new_markdown_cell(src)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    # stable cell ids: regenerating does not churn the diff
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb, cwd: str, timeout: int = 300):
    """Run every cell in a fresh ``python3`` kernel started in ``cwd``; returns seconds taken.

    The kernel imports the chainprod of this checkout (``PYTHONPATH`` gets the repository root).
    """
    from nbclient import NotebookClient

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PATH")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, saved["PYTHONPATH"]) if p)
    # the python3 kernelspec runs `python` from PATH: make that this interpreter's
    os.environ["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), saved["PATH"]) if p)
    try:
        t = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
        return time.perf_counter() - t
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None):
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=NOTEBOOK, help="notebook path (default: notebooks/walkthrough.ipynb)")
    ap.add_argument("--quick", action="store_true", help="small sizes and no Ray (seconds, not a minute)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray cell")
    ap.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    nb = build(quick=args.quick, ray=not (args.quick or args.no_ray))
    if not args.no_execute:
        secs = execute(nb, os.path.dirname(out), timeout=args.timeout)
        print(f"executed in {secs:.1f} s")
    nbformat.validate(nb)
    nbformat.write(nb, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
