"""The validation harness against running the same entry command directly on the same inputs, in the same run.

    python3 bench/validation_overhead.py [--store ./nccid-demo/store] [--repeat 5] [--fresh]

The baseline model is trained on the store's training set (examples/models/baseline/train.py). First, once: a
direct run and the sealed run that freezes the cohort (materialises it; see nccid/validation/frozen.py), and
the time `nccid validate freeze` takes to freeze it ahead instead (after a load, before any run). Then,
interleaved `--repeat` times:
- harness: a whole sealed run (`Workspace.sealed_run`): listing the store's validation set, the frozen cohort
  checked (or, with --fresh, selected and materialised anew, as every first run of an intended use does), the
  bubblewrap sandbox with its limits, reading predictions, metrics (DeLong, the bootstrap ROC band, calibration,
  subgroups) and the report (figures, JSON, CSV, checksums), audit;
- direct: `python3 predict.py` in the model folder, reading a copy of the same materialised inputs, no sandbox.
Prints the first run, min / median / max of each, the ratio of medians (goal: overhead under 10 %), where the
harness's wall time goes (from the run's progress calls: every second of the sealed run falls in one stage), its
cost beyond the model and the model duration above which that cost is under 10 %, and peak memory (this process
and its children). Work the harness does on helper threads while the model runs (hashing the inputs, the ground truth,
importing and warming the metrics' and report's libraries) costs wall time only where the model ends first:
"waiting for the helpers". Without --store (or if it does not exist), it makes a store like the demo's
validation set: 300 patients, radiographs at the demo's size (scale 0.5).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _common import spread

from nccid.store import LocalStore, open_store
from nccid.synth.national import SynthSpec, generate
from nccid.validation.cohort import select_cohort, write_inputs
from nccid.validation.demo import default_models_dir, train_baseline
from nccid.validation.sandbox import Limits, remove_tree, run_direct
from nccid.validation.service import Workspace
from nccid.warehouse.catalog import Catalog
from nccid.warehouse.loader import load


def demo_like_store(folder: Path) -> str:
    store = LocalStore(folder / "store")
    spec = SynthSpec(seed=0, patients=300, scale=0.5, imaged_fraction=1.0, xray_share=1.0, mr_share=0.0)
    generate(store, SynthSpec(**{**spec.__dict__, "awkward": False}))
    catalog = Catalog(folder / "catalog.sqlite")
    try:
        load(store, catalog)
    finally:
        catalog.close()
    return str(folder / "store")


STAGES = {  # the first words of each progress phase of Workspace.sealed_run -> the stage it starts
    "selecting": "cohort selection",
    "preparing": "materialising (or checking) the inputs",
    "running": "running the model",
    "analysing": "analysing the predictions",
    "writing": "report, audit, deleting the inputs",
}


def wall_stages(start: float, marks: list[tuple[str, float]], end: float) -> dict[str, float]:
    """Seconds from each progress phase to the next (the last to the end of the run), by stage name: together
    they are the whole wall time of the run."""
    out = {}
    times = [start, *(t for _, t in marks[1:]), end]
    for (phase, _), begin, finish in zip(marks, times[:-1], times[1:], strict=True):
        out[STAGES[phase.split()[0]]] = finish - begin
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="nccid-demo/store", help="a loaded store (default: nccid demo's)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="every run freezes its cohort anew (a first run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nccid-bench-validation-") as tmp:
        work = Path(tmp)
        url = args.store
        if not Path(url).is_dir() and "://" not in url:
            print(f"{url} not found: making a demo-like store (300 patients, scale 0.5) ...")
            url = demo_like_store(work)
        store = open_store(url, must_exist=True)
        model, printed = train_baseline(url, default_models_dir(), work / "build")
        print(f"baseline: {printed}")
        space = Workspace(work / "ws", create=True)
        sub = space.submit(model, "bench")
        inputs = work / "direct-input"
        cohort = select_cohort(store, sub.manifest.intended_use)
        write_inputs(store, cohort, inputs)
        print(f"cohort: {len(cohort.cases)} cases from {url}")
        harness, direct, stages, sandboxed = [], [], [], []
        load_before = os.getloadavg()[0]
        first_direct = first_harness = 0.0
        for n in range(-1, args.repeat):  # n = -1: the first run, which freezes the cohort
            output = work / f"direct-output-{n}"
            output.mkdir()
            took = run_direct(sub.manifest.entry, sub.model_dir, inputs, output)
            marks: list[tuple[str, float]] = []
            start = time.perf_counter()
            summary = space.sealed_run(
                sub.id, store, "bench", limits=Limits(), require_dry_run=False, fresh_cohort=args.fresh,
                progress=lambda phase, marks=marks: marks.append((phase, time.perf_counter())),
            )  # fmt: skip
            end = time.perf_counter()
            assert summary.sandbox.status == "completed", summary.sandbox
            assert summary.frozen.reused == (n >= 0 and not args.fresh), summary.frozen
            if n < 0:
                first_direct, first_harness = took, end - start
                continue
            direct.append(took)
            harness.append(end - start)
            stages.append(wall_stages(start, marks, end))
            sandboxed.append(summary.sandbox.seconds)
        clock = time.perf_counter()
        space.freeze_cohort(sub.id, store, "bench", fresh=True)
        ahead = time.perf_counter() - clock
        remove_tree(inputs)
    ratio = statistics.median(harness) / statistics.median(direct)
    print(
        f"first run (freezes the cohort): direct {first_direct:.2f} s, harness {first_harness:.2f} s: "
        f"harness / direct {first_harness / first_direct:.2f}"
    )
    print(f"or frozen ahead (`nccid validate freeze`, once per intended use and validation set): {ahead:.2f} s")
    later = "every run freezing its cohort anew (--fresh)" if args.fresh else "later runs, on the frozen cohort"
    print(f"{later}:")
    print(f"direct entry command:       {spread(direct, ' s')}")
    print(f"harness (whole sealed run): {spread(harness, ' s')}")
    print("  where its wall time goes:")
    waits = [s["running the model"] - t for s, t in zip(stages, sandboxed, strict=True)]
    for stage in stages[0]:
        print(f"  {stage:34s} {spread([s[stage] for s in stages], ' s')}")
        if stage == "running the model":
            print(f"  {'  of which the sandboxed command':34s} {spread(sandboxed, ' s')}")
            print(f"  {'  of which waiting for the helpers':34s} {spread(waits, ' s')}")
    sandbox = statistics.median(sandboxed) / statistics.median(direct)
    print(f"sandboxed entry command / direct: {sandbox:.2f}")
    print(f"harness / direct: {ratio:.2f} (overhead {100 * (ratio - 1):.0f} %; goal under 10 %)")
    fixed = statistics.median(harness) - statistics.median(direct)
    beyond = {k: statistics.median(s[k] for s in stages) for k in stages[0] if k != "running the model"}
    beyond["waiting for the helpers"] = statistics.median(waits)
    beyond["the sandbox"] = statistics.median(sandboxed) - statistics.median(direct)
    parts = ", ".join(f"{k} {v:+.2f}" for k, v in beyond.items())
    print(f"the harness's cost beyond the model: {fixed:.2f} s (medians: {parts})")
    print(
        f"for this cohort ({len(cohort.cases)} cases) that cost is under 10 % for a model taking over "
        f"{10 * fixed:.1f} s directly; this model takes {statistics.median(direct):.2f} s"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f}"
        " after (other work on the machine slows both sides, the harness more: it uses the second core)"
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory: this process {own:,.0f} MB, largest child {children:,.0f} MB")


if __name__ == "__main__":
    main()
