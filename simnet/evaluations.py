"""Evaluations an experiment applies to a finished simnet run.

Each evaluation reads the peers' final models from their stores (the newest model of
each ``DIR/peers/<name>/store.sqlite``, loaded with the store's own safetensors path),
evaluates them on the task's test sets, and returns flat ``{metric: value}`` numbers
(one run, one seed). Local-only baselines train each silo alone exactly like
``--compare-local``: the federation's shared initial model, ``rounds x local_steps``
AdamW steps in per-round chunks with the run's ``lr`` and ``batch_size``.

- ``federation``: ``fed_own`` (mean over peers of the metric on each peer's own test
  set, as in report.json), ``success``, ``bytes_mb``. Always applied.
- ``vs_best_silo``: ``fed_common`` / ``local_common_mean`` / ``local_common_best``: the
  metric on the federation-wide shared test set (``tests["all"]``) of every peer's final
  model (mean over peers) and of every silo trained alone (mean and best silo);
  ``margin_common = fed_common - local_common_best``; the same on own test sets
  (``fed_own``, ``local_own_best``, ``margin_own``).
- ``per_silo``: every silo paired with itself, federated vs alone. The shared test set is
  split once (seeded) into a validation half and a test half; the "best single silo" is
  the silo whose alone-model scores best on the **validation** half and is scored on the
  **test** half (``fed_common_test``, ``best_silo_common_test``, ``margin_best_silo``).
  Per silo ``i``: ``gain_own_<i>`` (its federated model minus its alone-model on its own
  test set), ``gain_common_<i>`` (the same on the test half) and, for catheter,
  ``gain_unseen_<i>`` (on the source test sets it never trained on); their means and
  ``silos_gain_own`` / ``silos_gain_common`` (how many silos gain, ``>= 0``).
- ``unseen_sources`` (catheter): Dice of each peer on the ``source:<s>`` test sets of the
  training sources it never saw (``unseen_dice``) and of those it saw (``seen_dice``).
- ``expert_weights`` (train-request strategies: fedefm): ``expert_weight_max``, the largest
  expert weight of each committed round (the peers' metric of that name), averaged over
  rounds and peers: 1/n is uniform over n experts, 1 one-hot.
- ``downstream_finetune`` (catheter with ``holdout_source``): the plain average of the
  peers' final models (FedEFM's foundation model) and a fresh model are each fine-tuned
  on the held-out source for ``options.finetune_steps`` steps; Dice / IoU on its test set.
- ``per_organ`` (organs): per-organ Dice on the shared test set of the peer that labels
  that organ (``dice_<organ>``), the mean over labelled organs (``dice_labelled``), and
  the same for each silo trained alone (``local_dice_<organ>``, ``local_dice_labelled``);
  with ``options.head_finetune_steps > 0`` also ``headft_dice_*``: the peer's final model
  after that many head-only steps on its own data (body frozen; SegViz's fine-tune).
- ``mixed_labels`` (lesion): ``fed_common`` and the pixel-labelled silo (silo 0) trained
  alone on the same steps (``pixel_only_common``).
- ``spect_baselines`` (spect): the peers' networks, FBP and MLEM on the ``infarct`` and
  ``normal`` test sets: PSNR, SSIM and ms per image.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from silomesh.simnet.runtime import limit_torch_threads
from silomesh.simnet.scenario import Scenario

if TYPE_CHECKING:  # torch and the tasks load lazily, when an evaluation runs
    from torch import nn

    from silomesh.models.task import ArrayDataset, SplitModel

log = logging.getLogger(__name__)


class RunModels:
    """The task, federation and final peer models of one finished run (lazily loaded)."""

    def __init__(self, scenario: Scenario, report: dict[str, Any]) -> None:
        from silomesh.models.registry import get_task
        from silomesh.peer.learner import federation_seed, synthetic_federation

        self.scenario = scenario
        self.report = report
        self.options = scenario.effective_task_options
        self.task = get_task(scenario.task, **self.options)
        self.federation = synthetic_federation(scenario.task, scenario.peers, scenario.seed, **self.options)
        self.init_seed = federation_seed(scenario.federation)
        self._models: list[nn.Module | None] | None = None

    @property
    def peer_names(self) -> list[str]:
        return [d["name"] for d in sorted(self.report["peers_detail"], key=lambda d: d["index"])]

    def final_models(self) -> list[nn.Module | None]:
        """Each peer's newest stored (shared) model (``None`` for a peer that stored none)."""
        if self._models is None:
            self._models = self._load_models(personal=False)
        return self._models

    def personal_models(self) -> list[nn.Module | None]:
        """Each peer's newest personal model (``personal_steps`` > 0), else ``None``."""
        return self._load_models(personal=True)

    def _load_models(self, *, personal: bool) -> list[nn.Module | None]:
        from silomesh.peer.learner import load_numpy
        from silomesh.peer.store import Store
        from silomesh.strategies.fedmix import TWIN_PREFIX

        out = Path(self.report["out"])
        models: list[nn.Module | None] = []
        for name in self.peer_names:
            store = Store(out / "peers" / name / "store.sqlite")
            try:
                record = store.latest_personal_model() if personal else store.latest_model()
                state = store.load_model(record.digest) if record is not None else None
            finally:
                store.close()
            if state is None:
                models.append(None)
                continue
            model = self.task.make_model(self.scenario.size, seed=self.init_seed)
            load_numpy(model, {k: v for k, v in state.items() if not k.startswith(TWIN_PREFIX)})
            model.eval()
            models.append(model)
        return models

    def train_alone(self, index: int, extra_steps: int = 0) -> nn.Module:
        """Silo ``index`` trained alone on the run's budget (as ``--compare-local``), plus
        ``extra_steps`` more steps in one last chunk (to match a personal fine-tune); with
        ``keep_unlabelled``, each chunk under that rule as the peers' training is."""
        from silomesh.models.train import train_local

        sc = self.scenario
        model = self.task.make_model(sc.size, seed=self.init_seed)
        for r in range(sc.rounds):
            train_local(self.task, model, self.federation.silos[index].train, sc.local_steps, sc.batch_size,
                        sc.lr, seed=self.init_seed + r + 1, teacher=self._teacher(model))
        if extra_steps > 0:
            train_local(self.task, model, self.federation.silos[index].train, extra_steps, sc.batch_size,
                        sc.lr, seed=self.init_seed + sc.rounds + 1, teacher=self._teacher(model))
        model.eval()
        return model

    def _teacher(self, model: nn.Module) -> nn.Module | None:
        """``model``'s frozen copy under ``keep_unlabelled`` (as a peer's ``Learner.teacher``), else None."""
        from silomesh.models.train import frozen_copy

        return frozen_copy(model) if self.scenario.keep_unlabelled else None

    def fine_tuned(self, index: int, model: nn.Module, steps: int) -> nn.Module:
        """A copy of ``model`` trained ``steps`` more steps on silo ``index``'s data (a personal model)."""
        import copy

        from silomesh.models.train import train_local

        sc = self.scenario
        tuned = copy.deepcopy(model)
        train_local(self.task, tuned, self.federation.silos[index].train, steps, sc.batch_size, sc.lr,
                    seed=self.init_seed + sc.rounds + 1, teacher=self._teacher(model))
        tuned.eval()
        return tuned

    def metric(self, model: nn.Module, data: ArrayDataset, name: str | None = None) -> float:
        return float(self.task.evaluate(model, data)[name or self.task.metric])


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _common_test(run: RunModels) -> ArrayDataset:
    tests = run.federation.tests
    return tests["all"] if "all" in tests else next(iter(tests.values()))


def eval_federation(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    fed = run.report["final"]["federated_mean"]
    return {
        "fed_own": math.nan if fed is None else float(fed),
        "success": float(run.report["round_success_rate"]),
        "bytes_mb": run.report["bytes_sent_total"] / 1e6,
    }


def eval_vs_best_silo(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    common = _common_test(run)
    fed = [run.metric(m, common) for m in run.final_models() if m is not None]
    fed_own = [run.metric(m, run.federation.silos[i].test)
               for i, m in enumerate(run.final_models()) if m is not None]
    local_common, local_own = [], []
    for i, silo in enumerate(run.federation.silos):
        model = run.train_alone(i)
        local_common.append(run.metric(model, common))
        local_own.append(run.metric(model, silo.test))
    out = {
        "fed_common": _mean(fed),
        "local_common_mean": _mean(local_common),
        "local_common_best": float(np.max(local_common)),
        "fed_own": _mean(fed_own),
        "local_own_mean": _mean(local_own),
        "local_own_best": float(np.max(local_own)),
    }
    out["margin_common"] = out["fed_common"] - out["local_common_best"]
    out["margin_own"] = out["fed_own"] - out["local_own_best"]
    out["beats_best_common"] = float(out["margin_common"] > 0)
    return out


def split_validation(data: ArrayDataset, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded split of ``data`` into a validation half and a test half (disjoint)."""
    order = np.random.default_rng([seed, 0x5A1D]).permutation(len(data))
    half = len(data) // 2
    if half == 0:
        raise ValueError(f"the shared test set has {len(data)} item(s); per_silo needs at least 2")
    return data.subset(np.sort(order[:half])), data.subset(np.sort(order[half:]))


def _unseen_sets(run: RunModels, index: int) -> list[ArrayDataset]:
    """The shared ``source:<s>`` test sets of sources silo ``index`` never trained on."""
    seen = set(run.federation.silos[index].info.get("sources", ()))
    holdout = run.options.get("holdout_source")
    return [data for name, data in run.federation.tests.items()
            if name.startswith("source:") and name.split(":", 1)[1] not in seen
            and name.split(":", 1)[1] != holdout]


def eval_per_silo(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    val, test = split_validation(_common_test(run), run.scenario.seed)
    out: dict[str, float] = {}
    alone_val: list[float] = []
    alone_test: list[float] = []
    fed_test: list[float] = []
    gains: dict[str, list[float]] = {k: [] for k in ("own", "common", "unseen", "personal_own",
                                                     "personal_common", "personal_unseen")}
    # the peers' own personal models (scenario personal_steps), else fine-tuned here (option)
    stored = run.scenario.personal_steps > 0
    personal_steps = run.scenario.personal_total_steps if stored else int(options.get("personal_steps", 0))
    personal_models = run.personal_models() if stored else None
    for i, (silo, model) in enumerate(zip(run.federation.silos, run.final_models(), strict=True)):
        alone = run.train_alone(i)
        alone_val.append(run.metric(alone, val))
        alone_test.append(run.metric(alone, test))
        if model is None:  # a crashed peer has no federated model: no pair for this silo
            continue
        fed_test.append(run.metric(model, test))
        pairs = {"own": (run.metric(model, silo.test), run.metric(alone, silo.test)),
                 "common": (fed_test[-1], alone_test[-1])}
        unseen = _unseen_sets(run, i)
        if unseen:
            pairs["unseen"] = (_mean([run.metric(model, d) for d in unseen]),
                               _mean([run.metric(alone, d) for d in unseen]))
        for kind, (fed, solo) in pairs.items():
            out[f"gain_{kind}_{i}"] = fed - solo
            gains[kind].append(fed - solo)
        personal = (personal_models[i] if personal_models is not None
                    else run.fine_tuned(i, model, personal_steps) if personal_steps > 0 else None)
        if personal is not None:  # personal model vs the silo alone on the same number of steps
            alone_more = run.train_alone(i, extra_steps=personal_steps)
            for kind, data in (("own", [silo.test]), ("common", [test]), ("unseen", unseen)):
                if data:
                    gain = (_mean([run.metric(personal, d) for d in data])
                            - _mean([run.metric(alone_more, d) for d in data]))
                    out[f"gain_personal_{kind}_{i}"] = gain
                    gains[f"personal_{kind}"].append(gain)
    best = int(np.argmax(alone_val))
    out["best_silo"] = float(best)
    out["best_silo_common_test"] = alone_test[best]
    out["fed_common_test"] = _mean(fed_test)
    out["margin_best_silo"] = out["fed_common_test"] - out["best_silo_common_test"]
    for kind, values in gains.items():
        if values:
            out[f"gain_{kind}_mean"] = _mean(values)
            out[f"silos_gain_{kind}"] = float(sum(v >= 0 for v in values))
    out["silos_paired"] = float(len(gains["own"]))
    return out


def eval_unseen_sources(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    seen_d: list[float] = []
    unseen_d: list[float] = []
    train_sources = [s.split(":", 1)[1] for s in run.federation.tests if s.startswith("source:")]
    holdout = run.options.get("holdout_source")
    for i, model in enumerate(run.final_models()):
        if model is None:
            continue
        seen = set(run.federation.silos[i].info["sources"])
        for source in train_sources:
            if source == holdout:
                continue
            value = run.metric(model, run.federation.tests[f"source:{source}"])
            (seen_d if source in seen else unseen_d).append(value)
    return {"seen_dice": _mean(seen_d), "unseen_dice": _mean(unseen_d)}


def eval_expert_weights(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    """How far a train-request strategy's expert weighting (fedefm's EMD weights) is from
    uniform: the largest expert weight of each committed round (the peers' ``expert_weight_max``
    metric), averaged over rounds and peers. With n experts, uniform is 1/n and one-hot 1."""
    from silomesh.simnet.stores import read_store

    out = Path(run.report["out"])
    values = [m["expert_weight_max"] for name in run.peer_names
              for m in read_store(out / "peers" / name / "store.sqlite").metrics.values()
              if "expert_weight_max" in m]
    return {"expert_weight_max": _mean(values)}


def eval_downstream_finetune(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    from silomesh.models.train import train_local
    from silomesh.peer.learner import load_numpy, to_numpy
    from silomesh.strategies.fedefm import global_model

    if not run.options.get("holdout_source"):
        raise ValueError("downstream_finetune needs task_options.holdout_source")
    steps = int(options.get("finetune_steps", 40))
    from silomesh.models.catheter import CatheterTask

    if not isinstance(run.task, CatheterTask):
        raise ValueError(f"downstream_finetune is for the catheter task, not {run.scenario.task}")
    sc = run.scenario
    finetune, test = run.task.downstream_split(sc.seed, **run.options)
    states = [to_numpy(m) for m in run.final_models() if m is not None]
    out: dict[str, float] = {}
    for label in ("foundation", "scratch"):
        model = run.task.make_model(sc.size, seed=run.init_seed)
        if label == "foundation":
            load_numpy(model, global_model(states))
            before = run.task.evaluate(model, test)
            out["foundation_zero_shot_dice"] = float(before["dice"])
        train_local(run.task, model, finetune, steps, sc.batch_size, sc.lr, seed=run.init_seed + 7)
        metrics = run.task.evaluate(model, test)
        out[f"{label}_dice"] = float(metrics["dice"])
        out[f"{label}_iou"] = float(metrics["iou"])
    return out


def eval_per_organ(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    from silomesh.models.organs import OrgansTask
    from silomesh.models.task import SplitModel

    if not isinstance(run.task, OrgansTask):
        raise ValueError(f"per_organ is for the organs task, not {run.scenario.task}")
    common = _common_test(run)
    organs = list(run.task.config.organs)
    fed: dict[str, list[float]] = {o: [] for o in organs}
    local: dict[str, list[float]] = {o: [] for o in organs}
    fed_all = []
    head_steps = int(options.get("head_finetune_steps", 0))
    ft: dict[str, list[float]] = {o: [] for o in organs}
    for i, model in enumerate(run.final_models()):
        organ = run.federation.silos[i].info["organ"]
        if model is None or organ is None:
            continue
        metrics = run.task.evaluate(model, common)
        fed[organ].append(float(metrics[f"dice_{organ}"]))
        fed_all.append(float(metrics["dice"]))
        if head_steps > 0:
            if not isinstance(model, SplitModel):
                raise ValueError(f"head_finetune_steps needs a model with a head; task {run.scenario.task}'s has none")
            tuned = _head_finetuned(run, i, model, head_steps)
            ft[organ].append(float(run.task.evaluate(tuned, common)[f"dice_{organ}"]))
        alone = run.task.evaluate(run.train_alone(i), common)
        local[organ].append(float(alone[f"dice_{organ}"]))
    out: dict[str, float] = {}
    for organ in organs:
        if fed[organ]:
            out[f"dice_{organ}"] = _mean(fed[organ])
            out[f"local_dice_{organ}"] = _mean(local[organ])
    out["dice_labelled"] = _mean([out[f"dice_{o}"] for o in organs if f"dice_{o}" in out])
    out["local_dice_labelled"] = _mean([out[f"local_dice_{o}"] for o in organs if f"local_dice_{o}" in out])
    out["dice_all_organs"] = _mean(fed_all)
    if head_steps > 0:
        for organ in organs:
            if ft[organ]:
                out[f"headft_dice_{organ}"] = _mean(ft[organ])
        out["headft_dice_labelled"] = _mean([out[k] for k in list(out) if k.startswith("headft_dice_")
                                             and k != "headft_dice_labelled"])
    return out


def _head_finetuned(run: RunModels, index: int, model: SplitModel, steps: int) -> SplitModel:
    """A copy of ``model`` whose head (only) is trained ``steps`` steps on silo ``index``'s data.

    Uses SegViz's own helper (:func:`silomesh.strategies.segviz.finetune_head`, body frozen);
    the same step a peer runs after each round when ``segviz``'s ``finetune_steps`` > 0, applied
    here once after the run so that runs without it can be compared with and without.
    """
    import copy

    from silomesh.models.train import batch_stream
    from silomesh.strategies.segviz import finetune_head

    tuned = copy.deepcopy(model)
    rng = np.random.default_rng(run.init_seed + index)
    stream = batch_stream(run.federation.silos[index].train, run.scenario.batch_size, rng)
    task = run.task
    finetune_head(tuned, stream, lambda m, b: task.loss(m, dict(b)), tuple(tuned.head_prefixes), steps,
                  run.scenario.lr)
    tuned.eval()
    return tuned


def eval_mixed_labels(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    common = _common_test(run)
    fed = [run.metric(m, common) for m in run.final_models() if m is not None]
    kinds = [s.info.get("label_kind") for s in run.federation.silos]
    pixel = [i for i, k in enumerate(kinds) if k == "mask"]
    pixel_only = [run.metric(run.train_alone(i), common) for i in pixel]
    return {"fed_common": _mean(fed), "pixel_only_common": _mean(pixel_only)}


def eval_spect_baselines(run: RunModels, options: dict[str, Any]) -> dict[str, float]:
    from silomesh.models.spect import SpectTask, run_baselines

    if not isinstance(run.task, SpectTask):
        raise ValueError(f"spect_baselines is for the spect task, not {run.scenario.task}")
    iters = int(options.get("mlem_iterations", 30))
    out: dict[str, float] = {}
    models = [m for m in run.final_models() if m is not None]
    for subset in ("infarct", "normal"):
        data = run.federation.tests[subset]
        geometry = run.task.geometry
        base = run_baselines(data, geometry, methods=("fbp", "mlem"), mlem_iterations=iters)
        nets = [run_baselines(data, geometry, model=m, methods=("network",))["network"] for m in models]
        base["network"] = {k: _mean([n[k] for n in nets]) for k in ("psnr", "ssim", "ms_per_image")}
        for method, metrics in base.items():
            for key in ("psnr", "ssim", "ms_per_image"):
                out[f"{subset}_{method}_{key}"] = float(metrics[key])
    return out


Evaluation = Callable[[RunModels, dict[str, Any]], dict[str, float]]

EVALUATIONS: dict[str, Evaluation] = {
    "vs_best_silo": eval_vs_best_silo,
    "per_silo": eval_per_silo,
    "unseen_sources": eval_unseen_sources,
    "expert_weights": eval_expert_weights,
    "downstream_finetune": eval_downstream_finetune,
    "per_organ": eval_per_organ,
    "mixed_labels": eval_mixed_labels,
    "spect_baselines": eval_spect_baselines,
}


def evaluate_run(names: tuple[str, ...] | list[str], scenario: Scenario, report: dict[str, Any],
                 options: dict[str, Any]) -> dict[str, float]:
    """Apply ``federation`` and the named evaluations to one finished run."""
    limit_torch_threads()
    run = RunModels(scenario, report)
    metrics = eval_federation(run, options)
    for name in names:
        t0 = time.time()
        metrics.update(EVALUATIONS[name](run, options))
        log.info("evaluation %s took %.1f s", name, time.time() - t0)
    return metrics
