"""The device check: backprop against every scan schedule, on the GPU and on all CPU cores.

    python3 benchmarks/device_check.py            # under 8 minutes on one GPU and 16 cores: ./device_check.csv
    python3 benchmarks/device_check.py --quick    # tiny sizes, seconds (what tests/test_device_check.py runs)

Problems (float64 unless ``--dtype float32``, batch 4, sizes geometric up to ``2^20``): ``diag_chain``,
``dense_chain``: ``cp.grad`` of L tanh ``cp.Diagonal`` (width 16) or ``cp.Dense`` (width 8 to 64) layers
and a readout; ``diag_products``: ``cp.suffix_products`` of L ``cp.Diag`` blocks; ``diag_recurrence``:
``cp.linear_recurrence(cp.Diag(a), b)`` over T steps; ``ssm``, ``gru``: ``cp.value_and_grad`` of a
``cp.DiagonalRecurrence`` (8 -> 32 -> 8) and of a GRU read from ``torch.nn.GRU`` (hidden 16) over T steps.
Devices (``--devices``): ``cuda``, torch CUDA tensors through chainprod's array path (the default backend
sends them to ``backend="array"``), ``method="backprop"`` (``"sequential"`` for products and recurrences)
and each scan, beside torch autograd's ``loss.backward()`` (torch loops for products and recurrences);
``cpu``, numpy inputs: chainprod's compiled backprop (one thread), each scan on ``backend="threads"`` with
``workers = os.cpu_count()``, torch at that thread count; ``torch-cpu`` (``--quick`` adds it): the
``cuda`` rows' code on torch CPU tensors.

``seconds``: one call end to end (forward and backward for gradients), the least of the repeats after a
warm-up call, ``torch.cuda.synchronize()`` around each GPU call. ``speedup``: the device's fastest backprop
row of the case over this row. ``max_rel_err``: ``max|result - reference| / max|reference|`` against the
case's first backprop row (the CPU's compiled one when CPU rows run). ``--budget`` (default 420 s, from the
first row): a row's time is estimated from its previous size and the method's work (``L`` for loops,
``L log2 L / 2`` for ``sklansky``, ...); a row that would overrun what is left, or a sixth of the budget, is
skipped with its larger sizes and listed under the table. ``independent`` runs up to ``L = 2048`` only.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import math
import os
import platform
import sys
import time

import numpy as np

import chainprod as cp

SCANS = ("sklansky", "brent_kung", "chunked", "hillis_steele", "independent")
INDEPENDENT_MAX_L = 2048  # L^2/2 blocks of width 16, batch 4: 4 GB at L = 4096 in float64
COLUMNS = ["device", "problem", "L", "width", "batch", "method", "role", "backend", "workers", "repeats",
           "seconds", "speedup", "max_rel_err", "matched", "checked_against", "status"]
TOL, BIG = {"float64": 1e-9, "float32": 1e-3}, [2 ** 10, 2 ** 14, 2 ** 17, 2 ** 20]
FULL = {"diag_chain": BIG, "diag_products": BIG, "diag_recurrence": BIG, "ssm": BIG, "gru": BIG[:3],
        "dense_chain": [2 ** 8, 2 ** 10, 2 ** 12, 2 ** 14]}
WIDTHS = {"diag_chain": [16], "diag_products": [16], "diag_recurrence": [16], "ssm": [32], "gru": [16],
          "dense_chain": [8, 16, 32, 64]}
QUICK_SIZES, QUICK_WIDTHS = [16, 64], {"dense_chain": [8]}
WARM_L = 8  # every row runs once at this size first: compiling, CUDA start-up; it seeds the estimates


def work(method, L):
    """Combine ops (or steps) of a method on L blocks: what its time scales with, for the estimates."""
    lg = max(1.0, math.log2(L))
    return {"sklansky": L * lg / 2, "hillis_steele": L * lg, "brent_kung": 2 * L, "chunked": 2 * L,
            "independent": L * L / 2}.get(method, L)


def flat(items):
    """One float64 numpy vector of a list of numpy arrays or of torch tensors (one copy to the host)."""
    if items and hasattr(items[0], "detach"):
        import torch
        return torch.cat([t.detach().reshape(-1) for t in items]).cpu().numpy().astype(np.float64)
    return np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in items])


# -- problems: build (numpy), run by chainprod, result as one vector, the same by torch ("peers") ---------
class Problem:
    backprop, PEERS, CPU_EXTRA = "backprop", {"torch autograd": "backprop"}, ()

    def result(self, out, d):
        return flat([out])


class Chain(Problem):
    def __init__(self, name, dense):
        self.name, self.dense = name, dense

    def build(self, L, w, N, dtype, rng):
        if self.dense:  # orthogonal weights: the gradient keeps its size through any depth
            q, r = np.linalg.qr(rng.standard_normal((L, w, w)))
            A = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        else:  # gains near 1: their products stay O(1) at any depth
            A = np.exp(rng.standard_normal((L, w)) / math.sqrt(L))
        b = 1e-3 * rng.standard_normal((L, w)) / math.sqrt(L)  # with x ~ 1e-3, tanh' ~ 1 at every layer
        p = [v.astype(dtype) for v in (A, b, rng.standard_normal((1, w)) / math.sqrt(w), np.zeros(1))]
        layer = cp.Dense if self.dense else cp.Diagonal
        chain = cp.Chain([layer(p[0][i], p[1][i], "tanh") for i in range(L)] + [cp.Dense(p[2], p[3], "identity")])
        return {"chain": chain, "x": (1e-3 * rng.standard_normal((N, w))).astype(dtype), "p": p}

    def run(self, d, method, kw):
        return cp.grad(d["chain"], d["x"], method=method, **kw)

    def result(self, g, d):
        return flat([p for layer in g for p in layer])

    def peers(self, d, torch, dev):
        A, b, W, c = (torch.tensor(p, device=dev, requires_grad=True) for p in d["p"])
        x = torch.as_tensor(d["x"], device=dev)

        def autograd():
            A.grad = b.grad = W.grad = c.grad = None
            h = x
            for Al, bl in zip(A.unbind(0), b.unbind(0)):  # unbind: one gradient scatter, not one per layer
                h = torch.tanh(torch.addmm(bl, h, Al.T) if self.dense else Al * h + bl)
            (h @ W.T + c).sum().backward()
            return [torch.cat([A.grad.reshape(len(b), -1), b.grad], 1), W.grad, c.grad]
        return {"torch autograd": autograd}


class DiagProducts(Problem):
    name, backprop, PEERS = "diag_products", "sequential", {"torch loop": "backprop", "torch.cumprod": "library scan"}

    def build(self, L, w, N, dtype, rng):
        a = np.exp(rng.standard_normal((L, N, w)) / math.sqrt(L)).astype(dtype)  # products stay O(1)
        return {"a": a, "mats": [cp.Diag(v) for v in a]}

    def to_device(self, d, conv):
        a = conv(d["a"])
        return {"a": a, "mats": [cp.Diag(v) for v in a.unbind(0)]}

    def run(self, d, method, kw):
        return cp.suffix_products(d["mats"], method=method, **kw)

    def result(self, out, d):
        return flat([m.values for m in out])

    def peers(self, d, torch, dev):
        a = torch.as_tensor(d["a"], device=dev)

        def loop():  # backprop's order: out[k] = out[k+1] * a[k]
            out = a.clone()
            for k in range(len(a) - 2, -1, -1):
                torch.mul(out[k + 1], out[k], out=out[k])
            return out
        return {"torch loop": loop, "torch.cumprod": lambda: torch.flip(torch.cumprod(torch.flip(a, (0,)), 0), (0,))}


class DiagRecurrence(Problem):
    name, backprop, PEERS, CPU_EXTRA = "diag_recurrence", "sequential", {"torch loop": "backprop"}, ("numba loop",)

    def build(self, T, w, N, dtype, rng):
        return {"a": rng.uniform(0.5, 1.0, (T, N, w)).astype(dtype), "b": rng.standard_normal((T, N, w)).astype(dtype)}

    def run(self, d, method, kw):
        return cp.linear_recurrence(cp.Diag(d["a"]), d["b"], method=method, **kw)

    def peers(self, d, torch, dev):
        a, b = torch.as_tensor(d["a"], device=dev), torch.as_tensor(d["b"], device=dev)

        def loop():
            out, h = torch.empty_like(b), torch.zeros_like(b[0])
            for t in range(len(b)):
                h = torch.addcmul(b[t], a[t], h, out=out[t])
            return out
        return {"torch loop": loop}

    def cpu_extra(self, d):
        loop = numba_loop()
        return {"numba loop": lambda: loop(d["a"], d["b"])}


@functools.lru_cache(maxsize=1)
def numba_loop():
    """``h_t = a_t * h_{t-1} + b_t``, compiled once: the CPU's compiled baseline of a diagonal recurrence."""
    import numba

    @numba.njit
    def loop(a, b, out):  # (T, lanes) arrays
        h = np.zeros(b.shape[1], b.dtype)
        for t in range(b.shape[0]):
            for j in range(b.shape[1]):
                h[j] = out[t, j] = a[t, j] * h[j] + b[t, j]
        return out
    return lambda a, b: loop(a.reshape(len(a), -1), b.reshape(len(b), -1), np.empty_like(b).reshape(len(b), -1))


class SSM(Problem):
    name = "ssm"

    def build(self, T, w, N, dtype, rng):
        layer = cp.DiagonalRecurrence.random(8, w, 8, seed=0, dtype=dtype)
        return {"model": layer, "x": rng.standard_normal((T, N, 8)).astype(dtype), "names": list(layer.params)}

    def run(self, d, method, kw):
        return cp.value_and_grad(d["model"], d["x"], loss="sum", method=method, **kw)

    def result(self, out, d):
        return flat([out[1][k] for k in d["names"]])

    def peers(self, d, torch, dev):
        ps = [torch.tensor(d["model"].params[k], device=dev, requires_grad=True) for k in d["names"]]
        u = torch.as_tensor(d["x"], device=dev)

        def autograd():
            a, B, C, D = ps
            a.grad = B.grad = C.grad = D.grad = None
            h, hs = torch.zeros(u.shape[1], len(a), dtype=u.dtype, device=dev), []
            for bu in (u @ B.T).unbind(0):
                h = a * h + bu
                hs.append(h)
            (torch.stack(hs) @ C.T + u @ D.T).sum().backward()
            return [p.grad for p in ps]
        return {"torch autograd": autograd}


class GRU(SSM):
    name = "gru"

    def build(self, T, w, N, dtype, rng):
        import torch
        torch.manual_seed(0)
        module = torch.nn.GRU(w, w).to(getattr(torch, np.dtype(dtype).name))
        return {"model": cp.from_torch(module), "module": module, "x": rng.standard_normal((T, N, w)).astype(dtype),
                "names": [n for n, _ in module.named_parameters()]}

    def peers(self, d, torch, dev):
        module, u = copy.deepcopy(d["module"]).to(dev), torch.as_tensor(d["x"], device=dev)

        def autograd():
            module.zero_grad(set_to_none=True)
            module(u)[0].sum().backward()
            return [p.grad for p in module.parameters()]
        return {"torch autograd": autograd}


PROBLEMS = {p.name: p for p in (Chain("diag_chain", False), DiagProducts(), DiagRecurrence(), SSM(), GRU(),
                                Chain("dense_chain", True))}


# -- one case's rows: (method, role, backend, workers, make(inputs on the device) -> call) ---------------
def specs(prob, device, P):
    """The rows of one case on one device, its backprop rows first."""
    def chainprod_row(m, kw):
        return lambda d: (lambda: prob.run(d, m, kw))

    def peer_row(label):
        return lambda d: d["peers"][label]
    if device == "cpu":
        label = "sequential (numpy loop)" if prob.name == "diag_recurrence" else f"{prob.backprop} (compiled)"
        rows = [(label, "backprop", "vectorized", 1, chainprod_row(prob.backprop, {}))]
        rows += [(k, "backprop", "numba", 1, peer_row(k)) for k in prob.CPU_EXTRA]
        rows += [(m, "scan", "threads", P, chainprod_row(m, {"backend": "threads", "workers": P})) for m in SCANS]
    else:
        rows = [(prob.backprop, "backprop", "array", "", chainprod_row(prob.backprop, {}))]
        rows += [(m, "scan", "array", "", chainprod_row(m, {})) for m in SCANS]
    return rows + [(k, role, "torch", "" if device == "cuda" else P, peer_row(k)) for k, role in prob.PEERS.items()]


def on_device(prob, data, device, torch):
    """The case's inputs on ``device`` (numpy for ``cpu``), and its peers' calls under ``"peers"``."""
    dev = "cuda" if device == "cuda" else "cpu"
    if device == "cpu":
        d = dict(data)
    elif hasattr(prob, "to_device"):
        d = prob.to_device(data, lambda x: torch.as_tensor(x, device=dev))
    else:  # arrays move; models keep their numpy parameters (a foreign x takes them to x's device)
        d = {k: torch.as_tensor(v, device=dev) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    d["peers"] = {**prob.peers(data, torch, dev), **(prob.cpu_extra(data) if prob.CPU_EXTRA and device == "cpu"
                                                     else {})}
    return d


def timed(call, sync, reps=None, left=math.inf):
    """(result, warm-up seconds, least seconds of the repeats, repeats): up to 3 repeats, as many as ``left``
    seconds allow; with none (the warm-up took all that is left) the warm-up's time, one-off work included."""
    def once():
        sync()
        t = time.perf_counter()
        out = call()
        sync()
        return out, time.perf_counter() - t
    out, warm = once()
    reps = min(reps or (3 if warm < 0.5 else 2 if warm < 3 else 1), int(max(left, 0) // max(warm, 1e-9)))
    return out, warm, min([once()[1] for _ in range(reps)] or [warm]), reps


class Budget:
    """Wall seconds left, and each row's estimate from its time at the previous size."""

    def __init__(self, seconds):
        self.total, self.cap, self.end = seconds, max(5.0, seconds / 6), time.perf_counter() + seconds
        self.history, self.dead = {}, {}  # key -> (L, seconds the row took); key -> "failed" or "skipped"

    def left(self):
        return self.end - time.perf_counter()

    def estimate(self, key, method, L):
        L0, seconds = self.history.get(key, (L, 0.0))
        return seconds * work(method, L) / work(method, L0)

    def why_skip(self, key, method, L):
        """``None`` to run the row, else why it is skipped."""
        if key in self.dead:
            return f"{self.dead[key]} at a smaller size"
        if method == "independent" and L > INDEPENDENT_MAX_L:
            return f"independent forms L^2/2 blocks: runs up to L = {INDEPENDENT_MAX_L} only"
        est, left = self.estimate(key, method, L), self.left()
        if left <= 0 or est > self.cap or 1.5 * est > left:  # a margin: estimates are rough
            return "the budget is spent" if left <= 0 else f"estimated {est:.0f} s > {self.cap:.0f} s per row" \
                if est > self.cap else f"estimated {est:.0f} s, {left:.0f} s of the budget left"
        return None


def run_case(prob, L, w, args, budget, devices, torch, P, rows, warm=False, N=4):
    """Every row of one case (problem, size, width) on every device, appended to ``rows``.

    The CPU's backprop rows run first (the first is the reference), then the accelerators', then the rest.
    """
    plan = [(dv, spec) for dv in devices for spec in specs(prob, dv, P)]
    plan.sort(key=lambda r: (r[0] != "cpu" or r[1][1] != "backprop", r[0] == "cpu"))  # stable sort
    todo = []
    for device, (label, role, backend, workers, make) in plan:
        key = (device, prob.name, w, label)
        row = dict.fromkeys(COLUMNS, "")
        row.update(device=device, problem=prob.name, L=L, width=w, batch=N, method=label, role=role,
                   backend=backend, workers=workers, status="ok")
        todo.append((device, key, row, make, None if warm else budget.why_skip(key, label if role == "scan"
                                                                                 else "loop", L)))
    est = budget.estimate(("build", prob.name, w), "loop", L)
    if todo[0][-1] or est > min(budget.left(), budget.cap):  # no reference row, or no time to build the case
        todo = [(dv, key, row, None, why or (f"its reference, {todo[0][2]['method']}, is skipped" if todo[0][-1]
                                             else f"building the case: estimated {est:.0f} s"))
                for dv, key, row, _, why in todo]
    else:
        t = time.perf_counter()
        data = prob.build(L, w, N, args.dtype, np.random.default_rng(L + w))
        budget.history[("build", prob.name, w)] = (L, time.perf_counter() - t)
    ref, ref_name, moved = None, "", {}
    for device, key, row, make, why in todo:
        if why:
            row["status"] = f"skipped: {why}"
            budget.dead.setdefault(key, "skipped")
            rows.append(row)
            continue
        t_row = time.perf_counter()  # the whole row (inputs moved, repeats, results back) seeds the next estimate
        try:
            if device not in moved:
                moved[device] = on_device(prob, data, device, torch)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            out, _, best, reps = timed(make(moved[device]), sync, 1 if warm or args.quick else None,
                                            math.inf if warm else budget.left())
            chainprod_row = row["backend"] in ("vectorized", "threads", "array")
            got = prob.result(out, data) if chainprod_row else flat(out if isinstance(out, list) else [out])
        except Exception as e:  # reported in its row; the other rows still run
            row["status"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"
            if not warm:  # a failure at the warm-up size shows at the first real size
                budget.dead[key] = "failed"
                rows.append(row)
            continue
        if ref is None and row["role"] == "backprop":
            ref, ref_name = got, f"{device} {row['method']}"
        err = math.nan if ref is None else float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-300))
        row.update(repeats=reps, seconds=best, max_rel_err=err, matched="yes" if err <= TOL[args.dtype] else "NO",
                   checked_against="itself (the reference)" if got is ref else ref_name)
        budget.history[key] = (L, best if warm else best * (1 + reps) if args.quick else time.perf_counter() - t_row)
        rows.append(row)
    moved.clear()  # frees the device's copies before the next case
    if "cuda" in devices:
        torch.cuda.empty_cache()


def add_speedups(rows):
    def case(r):
        return r["device"], r["problem"], r["L"], r["width"], r["batch"]
    best = {}
    for r in (r for r in rows if r["status"] == "ok" and r["role"] == "backprop"):
        best[case(r)] = min(best.get(case(r), math.inf), r["seconds"])
    for r in rows:
        if r["status"] == "ok" and case(r) in best:
            r["speedup"] = best[case(r)] / r["seconds"]


def print_table(rows):
    """The measured and failed rows as one table, then the skipped ones and why."""
    def fmt(v):
        return (f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.1e}") if isinstance(v, float) else str(v)
    cols = [c for c in COLUMNS if c != "checked_against"]
    cells = [[fmt(r[c])[:70] for c in cols] for r in rows if not r["status"].startswith("skipped")]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    for x in [cols] + cells:
        print("  ".join(v.ljust(n) for v, n in zip(x, widths)).rstrip())
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    print(f"\n{len(skipped)} rows skipped" + (" (device problem L width: method: why):" if skipped else ""))
    for r in skipped:
        print(f"  {r['device']} {r['problem']} L={r['L']} w={r['width']}: {r['method']}: {r['status'][9:]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    ap.add_argument("--budget", type=float, default=None, help="seconds to spend in all (default 420; 60 quick)")
    ap.add_argument("--out", default="device_check.csv", help="CSV path (default ./device_check.csv)")
    ap.add_argument("--dtype", default="float64", choices=sorted(TOL))
    ap.add_argument("--devices", default=None, help="comma list of cpu, cuda, torch-cpu (default: cpu, and cuda "
                                                    "when present; --quick adds torch-cpu)")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma list of {', '.join(PROBLEMS)}")
    args = ap.parse_args(argv)
    seconds = args.budget if args.budget is not None else (60.0 if args.quick else 420.0)
    try:
        import torch
    except ImportError:
        sys.exit("the device check needs torch: pip install torch")
    torch.set_num_threads(P := os.cpu_count() or 1)  # torch on CPU runs on every core, as the threads backend
    gpu = torch.cuda.is_available()
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["torch-cpu"] if args.quick else [])
    problems = args.problems.split(",")
    bad = [v for v in devices if v not in ("cpu", "cuda", "torch-cpu")] + [p for p in problems if p not in PROBLEMS]
    if bad:
        ap.error(f"unknown {bad}: devices are cpu, cuda, torch-cpu; problems are {', '.join(PROBLEMS)}")
    if not gpu:
        devices = [v for v in devices if v != "cuda"]
        print("no GPU present (torch.cuda.is_available() is False): timing the CPU rows only")
    elif not args.devices:
        devices.append("cuda")
    print(f"machine: {platform.platform()}, {P} CPU cores, python {platform.python_version()}, numpy "
          f"{np.__version__}, torch {torch.__version__}, chainprod {cp.__version__}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if gpu else ""))
    print(f"devices {','.join(devices)}; {args.dtype}; budget {seconds:.0f} s (from here on); CPU scans on "
          f"backend='threads' with workers={P}; torch on {P} threads")
    budget = Budget(seconds)
    cases = [(lvl, PROBLEMS[p], L, w) for p in problems
             for w in (QUICK_WIDTHS.get(p, WIDTHS[p]) if args.quick else WIDTHS[p])
             for lvl, L in enumerate(QUICK_SIZES if args.quick else FULL[p])]
    rows, t0 = [], time.perf_counter()
    for prob, w in dict.fromkeys((c[1], c[3]) for c in cases) if not args.quick else ():
        run_case(prob, WARM_L, w, args, budget, devices, torch, P, [], warm=True)
    print(f"warm-up at L={WARM_L} (compiling, start-up): {time.perf_counter() - t0:.1f} s" * (not args.quick))
    for _, prob, L, w in sorted(cases, key=lambda c: (c[0], c[1].name, c[3])):
        run_case(prob, L, w, args, budget, devices, torch, P, rows)
    add_speedups(rows)
    print_table(rows)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(r["status"].startswith("failed") for r in rows)
    print(f"{len(rows)} rows ({failed} failed) in {budget.total - budget.left():.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
