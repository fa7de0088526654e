"""The validation harness against running the same entry command directly on the same inputs, in the same run.

    python3 bench/validation_overhead.py [--store ./nccid-demo/store] [--repeat 3]

The baseline model is trained on the store's training set (examples/models/baseline/train.py). Then, interleaved
`--repeat` times:
- harness: a whole sealed run (`Workspace.sealed_run`): cohort selection from the store, materialisation of the
  opaque inputs, the bubblewrap sandbox with its limits, reading predictions, metrics (DeLong, the bootstrap
  ROC band, calibration, subgroups) and the report (SVG figures, JSON, CSV, checksums), audit;
- direct: `python3 predict.py` in the model folder, reading a copy of the same materialised inputs, no sandbox.
Prints min / median / max of each, the ratio of medians (goal: overhead under 10 %), the harness's own stages,
and peak memory (this process and its children). Without --store (or if it does not exist), it makes a store
like the demo's validation set: 300 patients, radiographs at the demo's size (scale 0.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _common import spread

from nccid.store import LocalStore, open_store
from nccid.synth.national import SynthSpec, generate
from nccid.validation.cohort import materialise, select_cohort
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="nccid-demo/store", help="a loaded store (default: nccid demo's)")
    parser.add_argument("--repeat", type=int, default=3)
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
        materialise(store, cohort, inputs)
        print(f"cohort: {len(cohort.cases)} cases from {url}")
        harness, direct, stages = [], [], []
        for n in range(args.repeat):
            output = work / f"direct-output-{n}"
            output.mkdir()
            direct.append(run_direct(sub.manifest.entry, sub.model_dir, inputs, output))
            start = time.perf_counter()
            summary = space.sealed_run(sub.id, store, "bench", limits=Limits(), require_dry_run=False)
            harness.append(time.perf_counter() - start)
            report = json.loads((summary.report_dir / "report.json").read_text())
            stages.append({**report["run"]["times"], "report writing": summary.report_seconds})
            assert summary.sandbox.status == "completed", summary.sandbox
        remove_tree(inputs)
    ratio = statistics.median(harness) / statistics.median(direct)
    print(f"direct entry command:     {spread(direct, ' s')}")
    print(f"harness (whole sealed run): {spread(harness, ' s')}")
    for stage in stages[0]:
        print(f"  {stage:22s} {spread([s[stage] for s in stages], ' s')}")
    sandbox = statistics.median(s["model run"] for s in stages) / statistics.median(direct)
    print(f"sandboxed model run / direct: {sandbox:.2f}")
    print(f"harness / direct: {ratio:.2f} (overhead {100 * (ratio - 1):.0f} %; goal under 10 %)")
    fixed = statistics.median(harness) - statistics.median(direct)
    print(f"the harness's cost beyond the model: {fixed:.2f} s, under 10 % for a model taking over {10 * fixed:.0f} s")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory: this process {own:,.0f} MB, largest child {children:,.0f} MB")


if __name__ == "__main__":
    main()
