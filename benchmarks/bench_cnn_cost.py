"""What the network costs: 3-conv vs 4-conv, against this machine's GEMM peak.

    python benchmarks/run.py --only cnn_cost [--quick]

Both variants of :func:`robopol_clean.classify.cnn.build_model` are trained from the
same seed on the same fixed small set (the normalised cutouts of every labelled
artifact of the benchmark's training frames, ``SEEDS["benchmark_train"]`` of the
registry :mod:`seeds` (20_000-20_007), plus a seeded sample of their star spots, 1000
cutouts in all quick / 4000 full; class-weighted Keras ``fit``, batch 64, no
augmentation, 2 / 8 epochs) and scored on the held-out test frames' detections
(``SEEDS["benchmark_test"]``, 10_000-10_007; quick runs: the first frame of each).
Inference throughput is measured through :meth:`CNNClassifier.predict_cutouts` on
normalised cutouts already in memory: the freshly trained variants run in Keras (a
``tf.function``), the shipped model in the engine the pipeline uses (ONNX Runtime, as
``get_classifier("cnn")`` loads it). FLOPs per cutout are counted from the layer shapes (2 x multiply-adds of the
convolutions and dense layers; pooling, ReLU and bias ignored) and compared with a
numpy float32 2048^3 matrix multiply measured in the same run: the practical ceiling
of any dense arithmetic on this machine.
"""

from __future__ import annotations

import numpy as np
from _common import (
    Context,
    Section,
    Timer,
    cnn_model_path,
    fmt,
    load_default_classifier,
    log,
    plural,
    roc_auc,
)
from labelled import labelled_set

KEY = "cnn_cost"
TITLE = "CNN cost: 3-conv vs 4-conv, throughput vs this machine's GEMM peak"


def gemm_peak(n: int = 2048, repeat: int = 3) -> float:
    """Best-of-``repeat`` numpy float32 ``n x n @ n x n`` rate (FLOP/s)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (threads, caches)
    best = np.inf
    for _ in range(repeat):
        with Timer() as t:
            a @ b
        best = min(best, t.s)
    return 2.0 * n**3 / best


def model_flops(model) -> int:
    """FLOPs of one forward pass of one cutout (2 x MACs of Conv2D and Dense layers)."""
    total = 0
    for layer in model.layers:
        kind = layer.__class__.__name__
        if kind == "Conv2D":
            kh, kw, cin, cout = (int(v) for v in layer.kernel.shape)
            _, h, w, _ = layer.output.shape
            total += 2 * kh * kw * cin * cout * int(h) * int(w)
        elif kind == "Dense":
            cin, cout = (int(v) for v in layer.kernel.shape)
            total += 2 * cin * cout
    return total


def throughput(clf, cutouts: np.ndarray, n: int, repeat: int = 3) -> float:
    """Cutouts per second through ``clf.predict_cutouts`` (best of ``repeat``)."""
    reps = int(np.ceil(n / max(len(cutouts), 1)))
    x = np.concatenate([cutouts] * reps)[:n] if len(cutouts) else np.zeros((n, 64, 64), np.float32)
    clf.predict_cutouts(x[:512])  # trace + warm-up
    best = np.inf
    for _ in range(repeat):
        with Timer() as t:
            clf.predict_cutouts(x)
        best = min(best, t.s)
    return n / best


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    try:
        from robopol_clean.classify.cnn import (
            VARIANTS,
            CNNClassifier,
            build_model,
            normalisation_params,
        )
    except ImportError as exc:
        sec.status = "skipped"
        sec.notes.append(f"robopol_clean.classify.cnn.build_model not available ({exc})")
        return sec
    import keras

    train = labelled_set(ctx, "train", keep_cutouts=True)
    test = labelled_set(ctx, "test", keep_cutouts=True)
    epochs = 2 if ctx.quick else 8
    n_infer = 2048 if ctx.quick else 8192
    # A fixed small set: every artifact plus a seeded sample of star spots.
    n_total = 1000 if ctx.quick else 4000
    labels = train.labels
    art = np.flatnonzero(labels == 1)
    stars = np.flatnonzero(labels == 0)
    rng = np.random.default_rng(0)
    stars = rng.choice(stars, min(stars.size, max(n_total - art.size, 0)), replace=False)
    pick = np.sort(np.concatenate([art, stars]))
    x, y = train.cutouts[pick][..., None], labels[pick].astype(np.float32)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    cw = {0: y.size / (2.0 * max(n_neg, 1)), 1: y.size / (2.0 * max(n_pos, 1))}
    meta = {"normalisation": normalisation_params()}

    # Train and score every variant first; then time GEMM and all inference back to back,
    # so the machine's load (shared cores) is as similar as possible between them.
    nets = {}
    for variant in [v for v in ("3conv", "4conv") if v in VARIANTS]:
        keras.utils.set_random_seed(0)
        model = build_model(variant, seed=0)
        with Timer() as tt:
            model.fit(x, y, epochs=epochs, batch_size=64, class_weight=cw, verbose=0, shuffle=True)
        clf = CNNClassifier(model, meta)
        auc = roc_auc(test.labels, clf.predict_cutouts(test.cutouts))
        nets[variant] = (clf, tt.s, auc)
        log(f"cnn_cost: {variant} trained in {tt.s:.1f} s, test AUC {auc:.3f}")
    clf_default, name, load_s, why = load_default_classifier(ctx)
    with Timer() as tg:
        peak = gemm_peak()
    sec.data["gemm_flops"] = peak

    sec.columns = ["network", "parameters", "MFLOP / cutout", "train s (per epoch)", "test AUC",
                   "cutouts / s", "GFLOP/s", "% of GEMM peak"]
    rows = {}
    for variant, (clf, train_s, auc) in nets.items():
        model = clf.model
        rate = throughput(clf, test.cutouts, n_infer)
        fl = model_flops(model)
        rows[variant] = {"params": int(model.count_params()), "flops_per_cutout": fl,
                         "train_seconds": train_s, "epochs": epochs, "test_auc": auc,
                         "cutouts_per_s": rate, "gflops": rate * fl / 1e9,
                         "fraction_of_gemm": rate * fl / peak, "filters": list(VARIANTS[variant])}
        sec.rows.append([f"{variant} {tuple(VARIANTS[variant])}", f"{model.count_params():,}",
                         fmt(fl / 1e6, 1), f"{train_s:.1f} ({train_s / epochs:.1f})", fmt(auc),
                         f"{rate:,.0f}", fmt(rate * fl / 1e9, 1), fmt(100 * rate * fl / peak, 1)])
        log(f"cnn_cost: {variant} {rate:.0f} cutouts/s")

    if name == "cnn":
        model = clf_default.model
        fl = model_flops(model)
        rate = throughput(clf_default, test.cutouts, n_infer)
        auc = roc_auc(test.labels, np.asarray(test.table["p_cnn"]))
        variant = clf_default.metadata.get("variant", "?")
        rows["shipped"] = {"params": int(model.count_params()), "flops_per_cutout": fl,
                           "test_auc": auc, "cutouts_per_s": rate, "load_seconds": load_s,
                           "fraction_of_gemm": rate * fl / peak, "variant": variant,
                           "model": str(cnn_model_path())}
        tr = clf_default.metadata.get("training", {})
        sec.rows.append([f"shipped model ({variant})", f"{model.count_params():,}", fmt(fl / 1e6, 1),
                         f"{tr.get('seconds', '-')} (its full training)", fmt(auc), f"{rate:,.0f}",
                         fmt(rate * fl / 1e9, 1), fmt(100 * rate * fl / peak, 1)])
    else:
        sec.rows.append(["shipped model", "not available", "-", "-", "-", "-", "-", "-"])
        sec.notes.append(f"shipped model: {why}")
    sec.notes.insert(0, f"numpy float32 2048^3 GEMM peak on this machine: {peak / 1e9:.0f} GFLOP/s "
                     f"(best of 3, measured in this run, {tg.s:.1f} s)")
    sec.notes.insert(1, f"training set: {len(y)} cutouts (all {n_pos} artifacts, {n_neg} sampled stars) of "
                     f"{plural(len(train.seeds), 'frame')}, {epochs} epochs, class-weighted, batch 64; "
                     f"test: {len(test.labels)} cutouts of {plural(len(test.seeds), 'held-out frame')}")
    sec.notes.append(f"throughput: {n_infer} normalised 64x64 cutouts through predict_cutouts "
                     "(variants: Keras; shipped model: ONNX Runtime, the pipeline's engine), best of 3; "
                     "excludes cutting out and normalising")
    sec.data.update({"variants": rows, "epochs": epochs, "n_train": int(len(y)),
                     "n_test": int(len(test.labels))})
    return sec
