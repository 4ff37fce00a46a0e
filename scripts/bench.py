"""Benchmarks, measured as ratios of runs side by side (these machines are noisy).

    python scripts/bench.py audit            # gradient/frozen audit overhead vs a training epoch
    python scripts/bench.py sweep            # per-job sweep overhead; joblib n_jobs=2 vs serial
    python scripts/bench.py train            # training throughput vs a hand-written loop (classification)
    python scripts/bench.py train_lm         # the same for a causal LM (task=causal_lm, dict batches)
    python scripts/bench.py load             # 1 GB checkpoint: finetune dry run vs the textbook and bare recipes
    python scripts/bench.py lora             # LoRA rank 8 vs a full fine-tune of the text demo's model: step time, state bytes
    python scripts/bench.py all --out bench_results.json

Results are printed and written as JSON (default: bench_results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from finetune import config as _config  # noqa: F401
    from finetune.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


@contextmanager
def timed_functions(targets: list[tuple[object, str]], totals: dict[str, float]):
    """Wrap module attributes with timers that add their wall time to `totals`."""
    originals = []
    for module, name in targets:
        original = getattr(module, name)
        originals.append((module, name, original))

        def wrapper(*args, __original=original, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                totals[__name] = totals.get(__name, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def bench_audit(epochs: int = 3) -> dict:
    """Audit cost (first-step gradient check, optimizer/trainable check, frozen checksums before
    and after) as a fraction of one training epoch, on the demo and on a ResNet-18 linear probe."""
    import finetune.loop
    import finetune.session
    from finetune.run import run

    cases = {
        "demo (full fine-tune)": ["trainer.progress=false", f"trainer.epochs={epochs}"],
        "demo (probe_then_finetune)": ["policy=probe_then_finetune", "trainer.progress=false", f"trainer.epochs={epochs}",
                                       "policy.unfreeze.0.at_epoch=2"],
        "resnet18 64x64 linear probe (fake data)": [
            "model=resnet18", "checkpoint=none", "data=fake", "data.train.image_size=[3,64,64]", "data.val.image_size=[3,64,64]",
            "data.train.size=512", "policy.new=freeze", "policy.train=[fc]", "policy.bn=freeze_stats", "trainer.progress=false",
            f"trainer.epochs={epochs}",
        ],
    }
    results = {}
    for label, overrides in cases.items():
        totals: dict[str, float] = {}
        targets = [(finetune.loop, "audit_gradients"), (finetune.session, "check_optimizer_matches"),
                   (finetune.session, "checksums"), (finetune.session, "frozen_tensors")]
        epoch_totals: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp, timed_functions(targets, totals), \
                timed_functions([(finetune.loop, "fit")], epoch_totals):
            cfg = compose(overrides)
            start = time.perf_counter()
            summary = run(cfg, Path(tmp))
            wall = time.perf_counter() - start
        # One epoch as the user waits for it: training steps, evaluation and the epoch's checkpoint.
        epoch_s = (epoch_totals["fit"] - totals.get("audit_gradients", 0.0) - totals.get("check_optimizer_matches", 0.0)) / summary["epochs"]
        audit_s = sum(totals.values())
        results[label] = {
            "audit_s": round(audit_s, 5),
            "train_epoch_s": round(epoch_s, 4),
            "audit_over_one_epoch": round(audit_s / epoch_s, 5),
            "audit_parts_s": {k: round(v, 5) for k, v in totals.items()},
            "run_wall_s": round(wall, 2),
        }
        print(f"audit  {label:45s} audit {audit_s * 1000:7.1f} ms  epoch {epoch_s:6.2f} s  "
              f"overhead {100 * audit_s / epoch_s:5.2f}% of one epoch (target <= 2%)")
    return results


def random_images(size: int, image_size, num_classes: int, seed: int = 0, **_ignored):
    """An in-memory dataset (TensorDataset): no decode cost, so the loop itself is measured."""
    image_size = image_size[-1] if isinstance(image_size, (list, tuple)) else image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, num_classes, (size,), generator=g)
    return torch.utils.data.TensorDataset(images, labels)


def hand_written_loop(dataset, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    """The baseline: what a PyTorch user writes by hand. Returns steady-state samples/s."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    done, samples, start = 0, 0, None
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup:
                start = time.perf_counter()
            elif done > warmup:
                samples += len(y)
            if done >= steps:
                break
    return samples / (time.perf_counter() - start)


def bench_train(rounds: int = 3, batch_size: int = 64, image_size: int = 64, size: int = 1024) -> dict:
    """Steady-state training throughput of `finetune` vs a hand-written loop, resnet18 at 64x64,
    same in-memory data, batch size, optimizer and threads; alternated, median of the ratios."""
    from finetune.run import run

    steps_per_epoch = size // batch_size
    epochs = 2
    dataset = random_images(size, image_size, 10)
    overrides = [
        "model=resnet18", "checkpoint=none", "optim=adamw", "optim.optimizer.lr=1e-3",
        "data=fake", "data.train._target_=bench.random_images", f"data.train.size={size}",
        f"data.train.image_size=[3,{image_size},{image_size}]", "data.train.num_classes=10",
        "data.val._target_=bench.random_images", "data.val.size=64", f"data.val.image_size=[3,{image_size},{image_size}]",
        "data.val.num_classes=10", "+data.val.seed=1",
        f"data.batch_size={batch_size}", "trainer.progress=false", f"trainer.epochs={epochs}", "trainer.log_every=10",
        "trainer.tensorboard=false",
    ]
    ours, baseline = [], []
    for _ in range(rounds):
        baseline.append(hand_written_loop(dataset, batch_size, steps_per_epoch * epochs, 3, 1e-3))
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(compose(overrides), Path(tmp))
        ours.append(summary["throughput"]["train_samples_per_s"])
        print(f"train  hand-written {baseline[-1]:7.1f} samples/s   finetune {ours[-1]:7.1f} samples/s   ratio {ours[-1] / baseline[-1]:.3f}")
    ratios = sorted(o / b for o, b in zip(ours, baseline))
    median = ratios[len(ratios) // 2]
    print(f"train  median ratio finetune / hand-written: {median:.3f} (target >= 0.95)")
    return {"model": "resnet18", "image_size": image_size, "batch_size": batch_size, "steps": steps_per_epoch * epochs,
            "hand_written_samples_per_s": [round(b, 1) for b in baseline], "finetune_samples_per_s": ours,
            "ratios": [round(r, 4) for r in ratios], "median_ratio": round(median, 4)}


class BenchGPT(nn.Module):
    """A small GPT-style causal LM (pre-norm Transformer blocks with a causal mask, tied embeddings):
    the model of the causal-LM throughput benchmark."""

    def __init__(self, vocab: int = 256, width: int = 128, depth: int = 2, heads: int = 4, length: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=input_ids.device)
        h = self.blocks(self.embed(input_ids) + self.position[:, :t], mask=mask, is_causal=True)
        return self.lm_head(self.norm(h))


class RandomTokens(torch.utils.data.Dataset):
    """Dict samples {input_ids, attention_mask, labels} (Hugging Face's convention: labels aligned with
    input_ids, the last quarter padded with -100 in every other sample), held in memory."""

    def __init__(self, size: int, length: int = 128, vocab: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (size, length), generator=g)
        self.mask = torch.ones(size, length, dtype=torch.long)
        self.mask[::2, -length // 4:] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def hand_written_lm_loop(dataset, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    """The causal-LM baseline as a PyTorch user writes it: shift, cross-entropy ignoring -100, AdamW."""
    torch.manual_seed(0)
    model = BenchGPT()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    done, samples, start = 0, 0, None
    while done < steps:
        for batch in loader:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup:
                start = time.perf_counter()
            elif done > warmup:
                samples += len(batch["input_ids"])
            if done >= steps:
                break
    return samples / (time.perf_counter() - start)


LM_CONFIGS = {
    "model/bench_gpt.yaml": "base: {_target_: bench.BenchGPT}\nadd: []\n",
    "data/bench_tokens.yaml": "train: {_target_: bench.RandomTokens, size: 512}\n"
                              "val: {_target_: bench.RandomTokens, size: 32, seed: 1}\nbatch_size: 16\n",
}


def bench_train_lm(rounds: int = 3, batch_size: int = 16, size: int = 512) -> dict:
    """Steady-state training throughput of `finetune task=causal_lm` vs a hand-written causal-LM loop:
    the same model (BenchGPT, 2 blocks, width 128, 128 tokens), in-memory dict batches with -100
    padding, loss (shifted cross-entropy), AdamW and threads; alternated, median of the ratios."""
    from finetune.run import run

    steps = size // batch_size * 2
    dataset = RandomTokens(size)
    ours, baseline = [], []
    with tempfile.TemporaryDirectory() as conf:
        for rel, text in LM_CONFIGS.items():
            (Path(conf) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(conf) / rel).write_text(text)
        overrides = [f"hydra.searchpath=[file://{conf}]", "model=bench_gpt", "data=bench_tokens", "task=causal_lm",
                     "checkpoint=none", "optim=adamw", "optim.optimizer.lr=1e-3", f"data.batch_size={batch_size}",
                     "trainer.progress=false", "trainer.epochs=2", "trainer.log_every=10", "trainer.tensorboard=false"]
        for _ in range(rounds):
            baseline.append(hand_written_lm_loop(dataset, batch_size, steps, 3, 1e-3))
            with tempfile.TemporaryDirectory() as tmp:
                summary = run(compose(overrides), Path(tmp))
            ours.append(summary["throughput"]["train_samples_per_s"])
            print(f"train_lm  hand-written {baseline[-1]:7.1f} samples/s   finetune {ours[-1]:7.1f} samples/s   "
                  f"ratio {ours[-1] / baseline[-1]:.3f}")
    ratios = sorted(o / b for o, b in zip(ours, baseline))
    median = ratios[len(ratios) // 2]
    print(f"train_lm  median ratio finetune / hand-written: {median:.3f} (target >= 0.95)")
    return {"model": "BenchGPT (2 blocks, width 128, 128 tokens, vocab 256)", "batch_size": batch_size, "steps": steps,
            "hand_written_samples_per_s": [round(b, 1) for b in baseline], "finetune_samples_per_s": ours,
            "ratios": [round(r, 4) for r in ratios], "median_ratio": round(median, 4)}


def run_sweep(sweep_dir: Path, overrides: list[str]) -> float:
    """Wall time of one `finetune --multirun` command, imports and process start included."""
    import subprocess

    exe = Path(sys.executable).parent / "finetune"
    start = time.perf_counter()
    done = subprocess.run([str(exe), "--multirun", f"hydra.sweep.dir={sweep_dir}", "trainer.progress=false",
                           "trainer.tensorboard=false", *overrides], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sweep failed:\n{done.stderr[-2000:]}")
    return elapsed


def bench_sweep(rounds: int = 3, train_epochs: int = 12) -> dict:
    """(a) Per-job overhead: an 8-job sweep of demo dry runs against a 1-job sweep, both with the basic
    launcher (jobs in one process): (T8 - T1) / 7 is what each job after the first costs.
    (b) Oversubscription: 4 demo training jobs with joblib n_jobs=2 against the same 4 jobs run serially.
    Whole commands are timed (imports and worker start-up included); rounds alternate, medians reported."""
    import statistics

    def median(xs):
        return round(statistics.median(xs), 3)

    one, eight, serial, parallel, threads = [], [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_sweep(tmp / "warm", ["dry_run=true", "dry_run_batches=0", "seed=0"])  # demo data cache, page cache
        for r in range(rounds):
            one.append(run_sweep(tmp / f"one{r}", ["dry_run=true", "dry_run_batches=0", "seed=0"]))
            eight.append(run_sweep(tmp / f"eight{r}", ["dry_run=true", "dry_run_batches=0", "seed=range(8)"]))
        jobs = ["optim.optimizer.lr=1e-3,2e-3,3e-3,5e-3", f"trainer.epochs={train_epochs}"]
        for r in range(rounds):
            serial.append(run_sweep(tmp / f"serial{r}", jobs))
            parallel.append(run_sweep(tmp / f"joblib{r}", [*jobs, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]))
            for kind in ("serial", "joblib"):
                threads[kind] = sorted({json.loads((tmp / f"{kind}{r}" / str(j) / "summary.json").read_text())["torch_threads"]
                                        for j in range(4)})
    per_job = [(e - o) / 7 for e, o in zip(eight, one)]
    ratios = [p / s for p, s in zip(parallel, serial)]
    return {
        "per_job_overhead": {"one_job_sweep_s": [round(x, 3) for x in one], "eight_job_sweep_s": [round(x, 3) for x in eight],
                             "per_job_after_first_s": [round(x, 3) for x in per_job], "median_per_job_s": median(per_job),
                             "target_s": 0.5},
        "joblib_vs_serial": {"jobs": 4, "epochs_per_job": train_epochs, "serial_s": [round(x, 2) for x in serial],
                             "joblib_n_jobs_2_s": [round(x, 2) for x in parallel], "ratios": [round(x, 3) for x in ratios],
                             "median_ratio": median(ratios), "target": 1.05, "torch_threads_per_job": threads},
    }


# ---- load: a ~1 GB checkpoint -----------------------------------------------------------------


class LinearStack(nn.Module):
    """Model A of the load benchmark: `depth` x Linear(width, width); 16 x 4096^2 fp32 is 1.07 GB."""

    def __init__(self, width: int = 4096, depth: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class LinearStackWithHead(LinearStack):
    """Model B written by hand for the baselines: model A + a new head. Its state_dict keys are those
    of finetune's `model.add: [{op: after, at: blocks, name: head, ...}]`."""

    def __init__(self, width: int = 4096, depth: int = 16, num_classes: int = 10):
        super().__init__(width, depth)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


LOAD_CONFIGS = {  # {width} and {depth} are filled in
    "model/load_bench.yaml": """\
base: {_target_: bench.LinearStack, width: {width}, depth: {depth}}
add:
  - {op: after, at: blocks, name: head, module: {_target_: torch.nn.Linear, in_features: {width}, out_features: 10}}
""",
    "checkpoint/load_bench.yaml": """\
path: ???
expect: {missing: ['head.*'], unexpected: []}
""",
}


def _peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, the high-water mark of this process's own
    memory map. (getrusage's ru_maxrss also counts the forked image before exec, i.e. the parent's
    resident memory when it started this process.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


LOAD_METHODS = ["finetune", "textbook", "bare", "bare_cpu_head"]


def load_child(method: str, ckpt: str, conf_dir: str, run_dir: str, out: str, width: str, depth: str) -> None:
    """One measurement in a fresh process. The clock starts after the imports each method needs
    (what is imported lazily during the work is part of the work) and stops when the model holds
    the checkpoint's weights (for finetune: when the dry run has written its reports)."""
    width_, depth_ = int(width), int(depth)
    fmt = "safetensors" if ckpt.endswith(".safetensors") else "pt"
    if method == "finetune":
        import finetune.commands.finetune
        import finetune.run  # imported by the command before any work
    elif fmt == "safetensors":
        from safetensors.torch import load_file
    rss_imports = _peak_rss_mb()
    stages: dict[str, float] = {}
    start = time.perf_counter()
    if method == "finetune":
        sys.argv = ["finetune", "--config-dir", conf_dir, "model=load_bench", "checkpoint=load_bench",
                    f"checkpoint.path={ckpt}", "dry_run=true", "dry_run_batches=0", f"hydra.run.dir={run_dir}", "trainer.progress=false"]
        with timed_functions([(finetune.run, "run")], stages):  # run(): build, read, load, policy, reports
            try:
                finetune.commands.finetune.main()
            except SystemExit as exc:
                if exc.code:
                    raise
    elif method == "textbook":  # build normally, read the whole file, copy into the model
        torch.manual_seed(0)
        model = LinearStackWithHead(width_, depth_)
        state_dict = load_file(ckpt) if fmt == "safetensors" else torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=False)
    else:  # bare: meta-device build, memory-mapped file, assign, materialise the new head
        with torch.device("meta"):
            model = LinearStackWithHead(width_, depth_)
        state_dict = load_file(ckpt) if fmt == "safetensors" else torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        model.load_state_dict(state_dict, strict=False, assign=True)
        if method == "bare":  # PyTorch's documented way; the first to_empty imports sympy (~0.3 s)
            model.head.to_empty(device="cpu")
            model.head.reset_parameters()
        else:  # bare_cpu_head: the head built again, on the CPU
            model.head = nn.Linear(width_, 10)
    result = {"wall_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": rss_imports}
    if method == "finetune":
        result["run_s"] = stages["run"]
        report = json.loads((Path(run_dir) / "load_report.json").read_text())
        result["counts"], result["init"] = report["counts"], report["init"]
    Path(out).write_text(json.dumps(result))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _write_load_checkpoints(root: Path, width: int, depth: int) -> dict[str, Path]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state_dict = LinearStack(width, depth).state_dict()
    files = {"pt": root / "model_a.pt", "safetensors": root / "model_a.safetensors"}
    torch.save(state_dict, files["pt"])
    save_file(state_dict, str(files["safetensors"]))
    return files


def bench_load(rounds: int = 3, width: int = 4096, depth: int = 16) -> dict:
    """Peak RSS and wall time of loading a ~1 GB checkpoint (.pt and .safetensors) into model A + a
    new head: `finetune dry_run=true` (checkpoint.low_memory auto: on above 512 MB) vs the textbook
    recipe (normal build, full read, load_state_dict(strict=False)) vs the bare recipe (meta build,
    memory map, assign=True, head materialised with to_empty + reset_parameters; and a variant that
    builds the head on the CPU instead). Each measurement is a fresh process; the order of methods
    rotates every round; medians over rounds. The checkpoint files are deleted at the end."""
    import subprocess

    methods = LOAD_METHODS
    with tempfile.TemporaryDirectory(prefix="finetune-load-bench-") as tmp:
        tmp_path = Path(tmp)
        conf_dir = tmp_path / "conf"
        for rel, text in LOAD_CONFIGS.items():
            (conf_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (conf_dir / rel).write_text(text.replace("{width}", str(width)).replace("{depth}", str(depth)))
        files = _write_load_checkpoints(tmp_path, width, depth)  # the parent's memory is freed on return
        sizes = {fmt: path.stat().st_size for fmt, path in files.items()}
        print(f"load   checkpoint {sizes['pt'] / 1e9:.2f} GB (.pt), {sizes['safetensors'] / 1e9:.2f} GB (.safetensors); "
              f"{depth} x Linear({width}, {width}) + a new Linear({width}, 10) head")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                            *filter(None, [os.environ.get("PYTHONPATH")])])}
        runs: dict[str, dict[str, list[dict]]] = {fmt: {m: [] for m in methods} for fmt in files}
        for round_ in range(rounds):
            for fmt, path in files.items():
                shift = round_ % len(methods)
                for method in methods[shift:] + methods[:shift]:  # who goes first rotates
                    out, run_dir = tmp_path / "result.json", tmp_path / f"run-{fmt}-{method}-{round_}"
                    begun = time.perf_counter()
                    proc = subprocess.run([sys.executable, __file__, "_load_child", method, str(path), str(conf_dir),
                                           str(run_dir), str(out), str(width), str(depth)], env=env, capture_output=True, text=True)
                    process_s = time.perf_counter() - begun
                    if proc.returncode != 0:
                        raise SystemExit(f"load bench: {method} on {path.name} failed:\n{proc.stdout}{proc.stderr}")
                    result = {**json.loads(out.read_text()), "process_wall_s": process_s}
                    runs[fmt][method].append(result)
                    print(f"load   round {round_ + 1} {fmt:11s} {method:13s} {result['wall_s']:5.2f} s after imports "
                          f"({process_s:5.2f} s whole process), peak RSS {result['peak_rss_mb']:5.0f} MB")
        results = {}
        for fmt in files:
            med = {m: {k: _median([r[k] for r in runs[fmt][m]]) for k in runs[fmt][m][0] if isinstance(runs[fmt][m][0][k], float)}
                   for m in methods}
            ratio = lambda key, a, b: round(med[a][key] / med[b][key], 3)
            ratios = {
                "rss_finetune_over_textbook": ratio("peak_rss_mb", "finetune", "textbook"),
                "rss_finetune_over_bare": ratio("peak_rss_mb", "finetune", "bare"),
                "time_finetune_over_textbook": ratio("wall_s", "finetune", "textbook"),
                "time_finetune_over_bare": ratio("wall_s", "finetune", "bare"),
                "time_finetune_over_bare_cpu_head": ratio("wall_s", "finetune", "bare_cpu_head"),
                "time_bare_over_textbook": ratio("wall_s", "bare", "textbook"),
                "process_time_finetune_over_textbook": ratio("process_wall_s", "finetune", "textbook"),
                "process_time_finetune_over_bare": ratio("process_wall_s", "finetune", "bare"),
                "process_time_bare_over_textbook": ratio("process_wall_s", "bare", "textbook"),
            }
            results[fmt] = {
                "checkpoint_bytes": sizes[fmt],
                "median": {m: {k: round(v, 3) for k, v in med[m].items()} for m in methods},
                "ratios": ratios,
                "finetune_load_report": {"counts": runs[fmt]["finetune"][0]["counts"], "init": runs[fmt]["finetune"][0]["init"]},
                "runs": {m: [{k: round(v, 3) for k, v in r.items() if isinstance(v, float)} for r in runs[fmt][m]] for m in methods},
            }
            print(f"load   {fmt:11s} medians after imports: " + ", ".join(
                f"{m} {med[m]['wall_s']:.2f} s / {med[m]['peak_rss_mb']:.0f} MB" for m in methods))
            print(f"load   {fmt:11s} peak RSS finetune/textbook {ratios['rss_finetune_over_textbook']:.3f} (target <= 0.6); "
                  f"time finetune/textbook {ratios['time_finetune_over_textbook']:.3f}" + (" (target <= 0.6)" if fmt == "pt" else "")
                  + f"; finetune/bare {ratios['time_finetune_over_bare']:.3f}" + (" (target <= 1.15)" if fmt == "safetensors" else "")
                  + f"; finetune/bare_cpu_head {ratios['time_finetune_over_bare_cpu_head']:.3f}")
    return {
        "model": f"{depth} x Linear({width}, {width}) + new Linear({width}, 10) head",
        "rounds": rounds,
        "timed": "wall_s: in a fresh process per measurement, from after its imports (torch; safetensors.torch; for "
                 "finetune also finetune.commands.finetune and finetune.run) until the model holds the weights (finetune: the whole "
                 "`finetune dry_run=true` command: Hydra composes the config, then run() builds, loads, applies the "
                 "policy and writes the reports; run_s is run() alone). process_wall_s: the whole process, interpreter "
                 "start and imports included. peak_rss_mb: VmHWM of that process. The checkpoint file is in the page "
                 "cache. bare: meta build + mmap + assign + head.to_empty() + reset_parameters() (to_empty's first use "
                 "imports sympy, ~0.3 s); bare_cpu_head: the same with the head built on the CPU instead.",
        **results,
    }


LORA_OPS = ("model.add=[{op: lora, at: 'blocks.*.attn.*', rank: 8, alpha: 16},"
            "{op: lora, at: 'blocks.*.mlp.*', rank: 8, alpha: 16}]")


def training_state_bytes(run_dir: Path) -> dict:
    """What training holds beside the weights, from the run's checkpoints/last.pt: the gradients (one
    per trainable parameter, its size) and the optimizer's state tensors (AdamW: two moments)."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    trainability = json.loads((run_dir / "trainability.json").read_text())
    trainable = sum(p["numel"] for p in trainability["params"] if p["trainable"])
    total = sum(p["numel"] for p in trainability["params"])
    optimizer = sum(t.numel() * t.element_size() for entry in state["optimizer"]["state"].values()
                    for t in entry.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"trainable": trainable, "params": total, "grad_bytes": trainable * 4, "optimizer_state_bytes": optimizer}


def bench_lora(rounds: int = 3, epochs: int = 2) -> dict:
    """LoRA rank 8 on every attention and MLP Linear (qkv, proj, fc, proj of each block) of the text
    demo's TinyGPT against a full fine-tune of the same model, alternated, same data and budget:
    the step time (from each run's throughput), gradient + optimizer-state bytes (from last.pt) and
    the trainable fraction. Also at width 256 (same architecture, from scratch), where rank 8 is a
    smaller part of each layer."""
    from finetune.run import run

    common = ["experiment=text_demo", "trainer.progress=false", "trainer.tensorboard=false", f"trainer.epochs={epochs}"]
    variants = {  # (overrides of both runs, of the lora run)
        "text_demo (d_model 64)": ([], []),
        # from scratch (the shipped model A is 64 wide): every tensor is new, so policy=lora freezes new ones
        "d_model 256": (["checkpoint.path=null", "checkpoint.expect.missing=null", "model.base.d_model=256"], ["policy.new=freeze"]),
    }
    results = {}
    for label, (extra, lora_extra) in variants.items():
        runs = {"full": [*common, *extra, "model.add=[]"],
                "lora": [*common, *extra, LORA_OPS, "policy=lora", *lora_extra, "optim.optimizer.lr=1e-2"]}
        rates: dict[str, list[float]] = {"full": [], "lora": []}
        state: dict[str, dict] = {}
        for _ in range(rounds):
            for name, overrides in runs.items():
                with tempfile.TemporaryDirectory() as tmp:
                    summary = run(compose(overrides), Path(tmp))
                    rates[name].append(summary["throughput"]["train_samples_per_s"])
                    state[name] = training_state_bytes(Path(tmp))
            print(f"lora  {label}: full {rates['full'][-1]:7.1f} samples/s   lora {rates['lora'][-1]:7.1f} samples/s")
        step_ratios = sorted(f / l for f, l in zip(rates["full"], rates["lora"]))  # time per step: lora / full
        held = {n: state[n]["grad_bytes"] + state[n]["optimizer_state_bytes"] for n in state}
        results[label] = {
            "step_time_ratios": [round(r, 4) for r in step_ratios], "median_step_time_ratio": round(step_ratios[len(step_ratios) // 2], 4),
            "full_samples_per_s": rates["full"], "lora_samples_per_s": rates["lora"],
            "grad_plus_optimizer_bytes": held, "bytes_ratio": round(held["lora"] / held["full"], 4),
            "trainable_fraction": round(state["lora"]["trainable"] / state["lora"]["params"], 4),
            "trainable": {n: state[n]["trainable"] for n in state}, "params": {n: state[n]["params"] for n in state},
        }
        r = results[label]
        print(f"lora  {label}: step time lora / full {r['median_step_time_ratio']:.3f} (target <= 1.0); "
              f"grad + optimizer bytes {r['bytes_ratio']:.3f} (target <= 0.1); trainable {r['trainable_fraction']:.1%}")
    return {"rank": 8, "epochs": epochs, "rounds": rounds, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) > 1 and sys.argv[1] == "_load_child":  # one measurement of `bench_load`, in its own process
        load_child(*sys.argv[2:9])
        return
    parser.add_argument("what", nargs="?", default="all", choices=["audit", "train", "train_lm", "load", "sweep", "lora", "all"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results.json")
    args = parser.parse_args()
    os.environ.setdefault("FINETUNE_CACHE", str(Path(tempfile.gettempdir()) / "finetune-bench-cache"))
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if args.what in ("audit", "all"):
        results["audit"] = bench_audit()
    if args.what in ("train", "all"):
        results["train"] = bench_train()
    if args.what in ("train_lm", "all"):
        results["train_lm"] = bench_train_lm()
    if args.what in ("load", "all"):
        results["load"] = bench_load()
    if args.what in ("sweep", "all"):
        results["sweep"] = bench_sweep()
    if args.what in ("lora", "all"):
        results["lora"] = bench_lora()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous.update(results)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
