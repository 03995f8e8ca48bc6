"""Which training data holds no-target rounds, and the start-up check against ``--rejection none``.

No-target training rounds (:mod:`utils.data.rejection`: they answer the rejection sentence and
have no mask) come from

- ``refer_seg`` with ``--false_premise_fraction F > 0`` (:mod:`utils.data.refer_seg`);
- ``refer_seg`` with ``grefcoco`` in ``--refer_seg_data`` (its no-target refs);
- ``reason_seg`` whose split holds queries flagged ``"no_target": true`` (the synthetic data's
  ``--no_target_queries``).

A model with ``--rejection none`` answers every round with ``[SEG]`` and has no way to say
"nothing", so training such a mixture would teach it something its evaluation never reads:
:func:`check_rejection_data` stops the run at start-up, before the model is built, with one line
naming ``--rejection``. Families drawn at rate 0 are not built and do not count.
"""

from __future__ import annotations

from utils.data.grefcoco import GREFCOCO
from utils.data.mixing import parse_mixture
from utils.data.reason_seg import count_no_target_in_split
from utils.data.refer_seg import check_false_premise_fraction
from utils.data.rejection import check_rejection_mode


def no_target_data(config) -> list[str]:
    """What in ``config``'s training mixture holds no-target rounds, each naming its flag
    (empty when nothing does). ``config`` carries the :class:`~utils.data.builders.DataConfig`
    fields."""
    rates = dict(parse_mixture(config.dataset, config.sample_rates))
    found = []
    if rates.get("refer_seg", 0) > 0:
        fraction = getattr(config, "false_premise_fraction", 0.0)
        if fraction > 0:
            found.append(f"--false_premise_fraction {fraction}")
        if GREFCOCO in [name.strip() for name in config.refer_seg_data.split("||")]:
            found.append(f"--refer_seg_data {config.refer_seg_data!r} (gRefCOCO)")
    if rates.get("reason_seg", 0) > 0:
        split = config.reason_seg_data.partition("|")[2] or "train"
        count = count_no_target_in_split(config.dataset_dir, split)
        if count:
            queries = "query" if count == 1 else "queries"
            name = f"--reason_seg_data {config.reason_seg_data!r}"
            found.append(f"{name} ({count} no-target {queries})")
    return found


def check_rejection_data(config) -> None:
    """Stop (``ValueError`` naming ``--rejection``) when the training mixture holds no-target
    rounds and the model's ``rejection`` is ``none``; also check ``--false_premise_fraction``."""
    check_false_premise_fraction(getattr(config, "false_premise_fraction", 0.0))
    if check_rejection_mode(getattr(config, "rejection", "none")) != "none":
        return
    found = no_target_data(config)
    if found:
        raise ValueError(
            f"{'; '.join(found)}: trains no-target rounds, which need --rejection answer or "
            "token (the model's is none): --rejection"
        )
