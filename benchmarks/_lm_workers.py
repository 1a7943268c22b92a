"""The QAT phase of bench_lm.py over several devices (--devices): one worker process per device, the jobs from a
shared queue.

A job is one uniform setting at one seed, or one AMPN seed (its sensitivity measurement and both AMPN settings'
runs, which share it). The job of seed 0 also evaluates the PTQ model and makes the lowered-vs-QAT check, as in the
one-device loop. A job's result depends on its setting and seed only (the data order is seeded per seed, the
quantized model comes from the same FP weights, AMPN seeds its own RNG), never on the worker that runs it, so the
merged results are those of the one-device run (bit for bit on CPU at the same thread count; on GPU up to the
kernels' own run-to-run differences).

The workers start (spawn) while the main process trains the FP model: their imports and CUDA initialisation
overlap it. The FP state, the data and the validation windows reach them through one file in the output folder,
loaded on the first job. Jobs are queued longest first (estimated from the probe's throughput; sigma clipping is
slower) and taken by whichever worker is free: longest-processing-time list scheduling. A worker that raises sends
its traceback, and the main process raises it; one that dies without a word (killed, out of memory) is noticed
within a second. Either way the other workers are terminated.
"""
from __future__ import annotations

import os
import queue
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

POLL_S = 1.0  # how often the main process checks its workers are alive while it waits for results
RELAY_S = 0.5  # how often a worker sends its progress-bar tokens


class WorkerError(RuntimeError):
    """A worker process failed: the message carries its device, the job and its traceback (or its exit code)."""


@dataclass(frozen=True)
class Job:
    kind: str  # "setting" (one uniform setting, one seed) | "ampn" (one AMPN seed, every AMPN setting)
    key: str  # the setting's key; "ampn" for an AMPN job
    seed: int
    cost_s: float = 0.0  # estimated seconds (the order of the queue)

    @property
    def id(self) -> tuple[str, int]:
        return self.key, self.seed

    def __str__(self) -> str:
        return f"{self.key} seed {self.seed}"


def make_jobs(settings, args, speed: dict, n_layers: int, val_tokens: int) -> list[Job]:
    """Every job of the QAT phase, longest first (ties in the order of the settings, then seeds). Cost estimates
    from the probe: training at the setting's throughput, quantize, the evaluations (PTQ, QAT, lowered), lower."""
    tok = args.batch * args.ctx
    ev = val_tokens / speed["eval_tok_s"]
    checks = 2 if args.device == "cuda" else 1  # lowered_gap: the cast QAT model (GPU) and the lowered one

    def run_s(s, seed):
        rate = speed["qat_sigma_tok_s" if s.a_clip == "sigma" else "qat_tok_s"]
        first = ev + checks * ev + speed["lower_s"] if seed == 0 else 0.0  # PTQ and the lowered check
        return speed["quantize_s"] + args.qat_steps * tok / rate + ev + first

    uniform, ampns = [s for s in settings if not s.ampn], [s for s in settings if s.ampn]
    jobs = [Job("setting", s.key, seed, run_s(s, seed)) for s in uniform for seed in range(args.seeds)]
    if ampns:
        passes = 1 + 3 * 7 * n_layers  # ampn.measure: the reference pass, 3 lower bit widths per linear
        sens = (speed["quantize_s"] + args.ampn_warmup * tok / speed["qat_tok_s"]
                + passes * args.ampn_calib * args.ctx / speed["eval_tok_s"])
        jobs += [Job("ampn", "ampn", seed, sens + sum(run_s(s, seed) + ev for s in ampns))  # + ev: PTQ per seed
                 for seed in range(args.seeds)]
    order = {j.id: i for i, j in enumerate(jobs)}
    return sorted(jobs, key=lambda j: (-j.cost_s, order[j.id]))


# ---- the worker process ---------------------------------------------------------------------------------------
class _Relay:
    """The progress bar of a worker: tokens and the postfix go to the main process's bar, the tokens batched."""

    def __init__(self, results, name: str):
        self.results, self.name, self.tokens, self.sent = results, name, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.tokens += n
        if time.perf_counter() - self.sent > RELAY_S:
            self.flush()

    def flush(self) -> None:
        if self.tokens:
            self.results.put(("tokens", self.name, self.tokens))
        self.tokens, self.sent = 0, time.perf_counter()

    def set_postfix_str(self, s: str) -> None:
        self.results.put(("postfix", self.name, s))


def _worker(name: str, device: str, args, tasks, results) -> None:
    """A worker process: sets its device and threads, then runs jobs from `tasks` until None, each loading the
    state file it names (once). Sends ("log" | "tokens" | "postfix" | "done" | "error", name, ...) to `results`."""
    job = None
    try:
        n = len(args.devices)
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // n))
        if args.device == "cuda":
            if torch.device(device).index is not None:
                torch.cuda.set_device(torch.device(device))  # "cuda" in every job function means this device
            torch.zeros(1, device="cuda")  # the CUDA context, while the main process still trains the FP model
        import importlib
        import bench_lm as B  # the job functions (and robuq_fx, torch)
        importlib.import_module("transformers.models.llama")  # now rather than on the first job (build_model)
        bar, state, loaded = _Relay(results, name), None, None

        def log(msg: str) -> None:
            results.put(("log", name, msg))
        while (task := tasks.get()) is not None:
            job, path = task
            if loaded != path:
                state = _load_state(path, args, B)
                loaded = path
            fp, corpus, val, ids, settings = state
            t = time.perf_counter()
            if job.kind == "ampn":
                ampns = [s for s in settings if s.ampn]
                out = B.run_ampn_seed(ampns, fp, args, corpus, val, ids, args.device, bar, log,
                                      fp.config.num_hidden_layers, job.seed)
            else:
                s = next(s for s in settings if s.key == job.key)
                out = B.run_setting(s, fp, args, corpus, val, ids, args.device, bar, log, seeds=[job.seed],
                                    ptq=job.seed == 0)
            bar.flush()
            results.put(("done", name, job, out, time.perf_counter() - t))
    except BaseException:  # noqa: BLE001 - everything goes back to the main process, which raises it
        results.put(("error", name, job, traceback.format_exc()))


def _load_state(path: str, args, B) -> tuple:
    """The FP model (built from the config, the trained weights loaded, eval mode as in the main process), the
    corpus, the validation windows, the example input and the settings, from the main process's state file."""
    import _lm_data as L
    st = torch.load(path, map_location="cpu", weights_only=True)
    fp = L.build_model(st["cfg"], args.fp_seed, args.device)
    fp.load_state_dict(st["fp"])
    fp.eval()
    corpus = L.Corpus(st["train"], st["val_stream"], [], [], {})
    val = st["val"]
    return fp, corpus, val, val[:2, :-1].long().to(args.device), B.all_settings(args.settings)


# ---- the main process -----------------------------------------------------------------------------------------
class Pool:
    """One worker process per device of args.devices (spawned now), a task queue and a result queue."""

    def __init__(self, args, log):
        ctx = mp.get_context("spawn")
        self.log, self.tasks, self.results, self.failed = log, ctx.Queue(), ctx.Queue(), False
        names = [d if args.devices.count(d) == 1 else f"{d}#{i}" for i, d in enumerate(args.devices)]
        self.procs = {name: ctx.Process(target=_worker, args=(name, d, args, self.tasks, self.results), daemon=True,
                                        name=f"bench_lm worker {name}")
                      for name, d in zip(names, args.devices)}
        for p in self.procs.values():
            p.start()

    def run(self, jobs: list[Job], state_path: str, bar, on_done) -> None:
        """Queues the jobs (in their order) and waits for all of them: on_done(job, result) per finished job, in
        the order they finish; the workers' logs and progress relayed to log and bar. Raises WorkerError."""
        for j in jobs:
            self.tasks.put((j, state_path))
        left, postfix = {j.id for j in jobs}, {}
        while left:
            try:
                msg = self.results.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            kind, name = msg[:2]
            if kind == "log":
                self.log(f"[{name}] {msg[2]}")
            elif kind == "tokens" and bar is not None:
                bar.update(msg[2])
            elif kind == "postfix" and bar is not None:
                postfix[name] = msg[2]
                bar.set_postfix_str("; ".join(f"{k}: {v}" for k, v in sorted(postfix.items())))
            elif kind == "done":
                job, out, secs = msg[2:]
                left.discard(job.id)
                self.log(f"[{name}] done: {job} in {secs:.1f} s (estimated {job.cost_s:.1f} s); {len(left)} jobs left")
                on_done(job, out)
            elif kind == "error":
                self.failed = True
                raise WorkerError(f"worker {name} failed" + (f" on job {msg[2]}" if msg[2] else " starting")
                                  + f":\n{msg[3]}")

    def _check_alive(self) -> None:
        dead = {n: p.exitcode for n, p in self.procs.items() if not p.is_alive()}
        if not dead:
            return
        self.failed = True
        try:  # an error sent just before the process ended is still in the pipe: raise that one
            while True:
                msg = self.results.get(timeout=POLL_S)
                if msg[0] == "error":
                    raise WorkerError(f"worker {msg[1]} failed on job {msg[2]}:\n{msg[3]}")
        except queue.Empty:
            pass
        raise WorkerError("worker(s) ended without a result: "
                          + ", ".join(f"{n} exit code {c}" for n, c in dead.items()) + " (killed? out of memory?)")

    def close(self) -> None:
        """Stops the workers: a None each (an idle worker ends), terminated after 10 s, or at once when one
        failed (the others may be in the middle of a job). Safe to call twice."""
        for _ in self.procs:
            self.tasks.put(None)
        deadline = time.monotonic() + (0.0 if self.failed else 10.0)
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
                p.join()
        self.tasks.cancel_join_thread()  # jobs left in the queue after a failure must not block the exit
        self.results.cancel_join_thread()


def run_jobs(pool: Pool, settings, fp, cfg, corpus, val, args, speed: dict, n_layers: int, bar, save):
    """The QAT phase on the pool's workers: the FP state to a file in args.out, every job queued, the results
    merged into bench_lm's structures (res[key] in the order of the settings, then AMPN; allocs) exactly as the
    one-device loop makes them. save(res) after each uniform setting whose seeds are all done."""
    import bench_lm as B
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f".bench_lm_fp_state.{os.getpid()}.pt"
    torch.save({"cfg": cfg, "fp": {k: t.detach().to("cpu") for k, t in fp.state_dict().items()},
                "train": corpus.train, "val_stream": corpus.val, "val": val}, path)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the FP phase's cached blocks, for the worker on the first device
    uniform, ampns = [s for s in settings if not s.ampn], [s for s in settings if s.ampn]
    jobs = make_jobs(settings, args, speed, n_layers, val.shape[0] * args.ctx)
    done: dict[tuple[str, int], dict] = {}
    seeds = range(args.seeds)

    def merged(s) -> dict:
        parts = [done[s.key, seed] for seed in seeds]
        r = {"ptq_bpb": parts[0]["ptq_bpb"], "bpb": [b for p in parts for b in p["bpb"]],
             "seeds": [x for p in parts for x in p["seeds"]]}
        r.update({"lowered": p["lowered"] for p in parts if "lowered" in p})
        return r

    def on_done(job, out):
        done[job.id] = out
        if job.kind == "setting" and all((job.key, seed) in done for seed in seeds):
            save({s.key: merged(s) for s in uniform if all((s.key, seed) in done for seed in seeds)})
    pool.log(f"QAT jobs: {len(jobs)} over {len(pool.procs)} workers ({', '.join(pool.procs)}), longest first; "
             f"estimated {sum(j.cost_s for j in jobs) / len(pool.procs) / 60:.1f} min each")
    try:
        pool.run(jobs, str(path), bar, on_done)
    finally:
        path.unlink(missing_ok=True)
    res = {s.key: merged(s) for s in uniform}
    allocs = {}
    if ampns:
        r, allocs = B.merge_ampn(ampns, [done["ampn", seed] for seed in seeds])
        res.update(r)
    return res, allocs
