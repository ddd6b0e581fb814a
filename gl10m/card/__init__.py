"""The dataset card: ``W/shards/README.md`` and its plots in ``W/shards/card/``.

:func:`write_card` reads the sidecar index and the manifest (counts), the ``meta.json`` of the
samples (QC statistics and provenance; every sample up to ``max_qc_samples``, else an evenly
spaced, key-ordered subset, each read by seek from its shard) and a few whole samples (example
mosaics), and writes:

* ``README.md``: what the data is, how it was built, the sample schema, per-split and per-state
  counts, every concept's count per split next to the GL-10M paper count, the QC rules and
  statistics, how to load it, licences and attribution;
* ``card/label_frequency.png``: scenes containing each concept, per split, log scale, sorted,
  with the GL-10M Figure 6 counts (scaled to this dataset's size) as reference markers;
* ``card/qc.png``: histograms of whatever QC statistics the samples' meta.json hold;
* ``card/example_{i}.png``: LR next to the HR mosaic with the per-tile dominant concept.

Nothing in it depends on the clock or the machine: the same shards give the same card (PNGs
are written without software/date metadata).

The package: :func:`write_card` here; ``plots`` (the figures and the example picks), ``qc`` (the
QC statistics read from meta.json), ``sections`` (the Markdown text, :func:`card_text`) and
``markdown`` (table, escaping and number helpers).
"""
from __future__ import annotations

from pathlib import Path

from gl10m import inspect as gi
from gl10m.card.plots import (GL10M_TRAIN_VAL, SPLIT_COLOURS, pick_examples, plot_examples, plot_label_frequency,
                              plot_qc, reference_scale)
from gl10m.card.qc import QC_PANELS, meta_subset, qc_summary, qc_values
from gl10m.card.sections import BANDS_META_KEY, GL10M_PAPER, META_KEYS, SCHEMA, build_outcome, card_text, georef_section
from gl10m.errors import UserError

CARD_DIR = "card"
README = "README.md"

__all__ = ["BANDS_META_KEY", "CARD_DIR", "GL10M_PAPER", "GL10M_TRAIN_VAL", "META_KEYS", "QC_PANELS", "README", "SCHEMA",
           "SPLIT_COLOURS", "build_outcome", "card_text", "georef_section", "meta_subset", "pick_examples",
           "plot_examples", "plot_label_frequency", "plot_qc", "qc_summary", "qc_values", "reference_scale",
           "write_card"]


def write_card(shards_dir: str | Path, profile, *, n_examples: int = 3, max_qc_samples: int | None = 20000) -> Path:
    """Write ``{shards_dir}/README.md`` and ``{shards_dir}/card/*.png``; return the README path."""
    root = gi.shards_root(shards_dir)
    index = gi.read_index(root)
    manifest = gi.read_manifest(root)
    if len(index) == 0:  # an empty build still gets a card that says so (and no stale plots)
        for old in (root / CARD_DIR).glob("*.png"):
            old.unlink()
        return gi.write_public(root / README, (
            f"# {profile.name}: a GL-10M-style Sentinel-2 / NAIP dataset with OpenStreetMap concepts\n\n"
            f"This shards folder holds no samples: the build (profile `{profile.name}` version {profile.version}, "
            f"hash `{profile.hash()}`) produced none. Run `gl10m download` and `gl10m shard` again once scenes "
            "are fetched.\n" + "".join(f"\n{line}\n" for line in build_outcome(manifest, 0))).encode("utf-8"))
    n_lab = len(index["labels"].iloc[0])
    if n_lab != profile.n_concepts:
        raise UserError(f"{root}: samples have {n_lab} labels but profile {profile.name} has "
                        f"{profile.n_concepts} concepts")
    st = gi.stats(root, profile)
    card = root / CARD_DIR
    card.mkdir(parents=True, exist_ok=True)

    plot_label_frequency(st, profile, card / "label_frequency.png")
    rows = meta_subset(index, max_qc_samples)
    metas = list(gi.iter_meta(root, rows))
    values = qc_values(metas)
    plot_qc(values, profile, card / "qc.png", len(metas), len(index))

    examples = pick_examples(index, max(0, int(n_examples)))
    plot_examples(root, examples, profile, card)
    for old in card.glob("example_*.png"):
        stem = old.stem.split("_", 1)[1]
        if not stem.isdigit() or int(stem) >= len(examples):
            old.unlink()

    text = card_text(st, manifest, profile, metas, values, examples, n_meta=len(metas))
    out = root / README
    gi.write_public(out, text.encode("utf-8"))
    return out
