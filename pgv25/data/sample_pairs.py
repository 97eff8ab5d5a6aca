"""`pgv25 data pairs`: preference pairs made from a model's own samples, for the DPO configs and curated fine-tuning.

Preference alignment moves a model among outputs it can already make: Diffusion-DPO on Pick-a-Pic, Playground v2.5's
and Emu's quality tuning. So the pairs come from the model itself (on-policy):

1. **Sample.** For each prompt of a prompt file (`pgv25 eval generate`'s formats), `samples` images from an export (a
   pipeline, or a LoRA on its base), made by the same sharded, resumable generator: image `<prompt id>_s<k>` has a
   seed of its own, lives at `images/<prompt id>/<prompt id>_s<k>.png`, and a rerun makes only the missing ones.
2. **Score.** Each image once, by a scorer: a Python callable `module:function` or `path/to/file.py:function` called
   as `function(images, prompts, **options) -> scores` (PIL images, their prompts, one number each: a reward model of
   your choice), or human labels, a CSV of `id,score` joined by image id (`images/meta_data.json` lists the ids).
   Each process scores its own share; scores are kept per scorer, so a rerun scores only what is new. An image the
   scorer fails on, or gives no finite number for, is a counted, logged skip.
3. **Pair.** Per prompt, the best-scored sample against the worst (`best-worst`), or every pair whose scores differ
   by more than `margin` (`all`): `pairs.jsonl`, a chosen/rejected manifest with the caption and both scores, read by
   the DPO configs (`type='manifest'`, `pairs.format='chosen_rejected'`); and the top `top` samples of each prompt as
   `top.jsonl`, an image/caption manifest for curated fine-tuning. `summary.json` counts everything.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import atomic_file
from .tables import first_line

logger = logging.getLogger("pgv25")
IMAGES = "images"
PAIRS, TOP, SUMMARY = "pairs.jsonl", "top.jsonl", "summary.json"
PAIRINGS = ("best-worst", "all")


@dataclass(frozen=True)
class Scored:
    id: str
    prompt_id: str
    prompt: str
    path: str  # relative to the output folder
    score: float


def sample_prompts(prompts, samples: int):
    """Each prompt's `samples` images as prompts of their own: id `<prompt id>_s<k>`, in the folder `<prompt id>`."""
    from ..eval.prompts import EvalPrompt

    return [EvalPrompt(f"{p.id}_s{k}", p.prompt, p.id) for p in prompts for k in range(samples)]


# --- scorers ------------------------------------------------------------------------------------------------------

def load_scorer(spec: str, options: dict):
    """`module:function` or `file.py:function` → a callable(images, prompts) -> scores; one line if it cannot load."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"--scorer {spec!r}: give module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise UserError(f"--scorer {spec!r}: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"pgv25_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 — any import failure of the user's code is one line
        raise UserError(f"--scorer {spec!r} cannot be imported: {type(error).__name__}: {first_line(error)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--scorer {spec!r}: {target} has no function {name!r}")
    return lambda images, prompts: function(images, prompts, **options)


def scorer_key(spec: str, options: dict) -> str:
    """Scores are kept per scorer and its options: another scorer scores afresh."""
    return hashlib.sha256(json.dumps([spec, sorted(options.items())], default=str).encode()).hexdigest()[:12]


def _as_scores(values, count: int) -> list[float | None]:
    """The scorer's answer as `count` floats (None where it is not a finite number)."""
    try:
        values = values.tolist() if hasattr(values, "tolist") else list(values)
    except TypeError:
        raise ValueError(f"returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != count:
        raise ValueError(f"returned {len(values)} scores for {count} images")
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        out.append(number if math.isfinite(number) else None)
    return out


def score_images(score, items: list, folder: Path, skipped: Counter) -> dict[str, float | None]:
    """{image id: score, or None for a skip} for `items` (EvalPrompts whose images exist), a prompt's samples per call;
    a call that fails is retried image by image, so one bad image costs only itself."""
    from PIL import Image

    from ..eval.generation import image_path

    results: dict[str, float | None] = {}
    by_prompt: dict[str, list] = {}
    for item in items:
        by_prompt.setdefault(item.category, []).append(item)
    for group in by_prompt.values():
        loaded = []
        for item in group:
            try:
                with Image.open(image_path(folder, item)) as image:
                    loaded.append((item, image.convert("RGB")))
            except OSError as error:
                skipped["unreadable image"] += 1
                logger.warning("sample %s is unreadable (%s): skipped", item.id, error)
                results[item.id] = None
        if not loaded:
            continue
        group, images = [item for item, _ in loaded], [image for _, image in loaded]
        try:
            values = _as_scores(score(images, [item.prompt for item in group]), len(group))
        except Exception:  # noqa: BLE001 — the user's scorer: find the image(s) it fails on, one at a time
            values = [_score_one(score, image, item, skipped) for item, image in loaded]
        for item, value in zip(group, values):
            if value is None:
                skipped["no finite score"] += 1
                logger.warning("the scorer gave %s no finite number: skipped", item.id)
            results[item.id] = None if value is None or value is FAILED else value
    return results


FAILED = object()  # a scorer call that raised (counted where it happened)


def _score_one(score, image, item, skipped: Counter):
    try:
        return _as_scores(score([image], [item.prompt]), 1)[0]
    except Exception as error:  # noqa: BLE001
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        logger.warning("the scorer failed on %s (%s: %s): skipped", item.id, type(error).__name__, first[:200])
        skipped["scorer failed"] += 1
        return FAILED


def read_labels(path: str) -> dict[str, float]:
    """Human labels: a CSV with an `id` column and a `score` (or `label`) column; one line if it cannot be read."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--labels {file} does not exist (a CSV with columns id and score)")
    reader = csv.DictReader(io.StringIO(file.read_text(encoding="utf-8", errors="replace"), newline=""))
    columns = reader.fieldnames or []
    value_column = "score" if "score" in columns else "label" if "label" in columns else None
    if "id" not in columns or value_column is None:
        raise UserError(f"--labels {file} needs columns id and score (or label); its columns are {columns}")
    labels, bad = {}, 0
    for row in reader:
        try:
            value = float(row[value_column])
        except (TypeError, ValueError):
            bad += 1
            continue
        if math.isfinite(value):
            labels[str(row["id"]).strip()] = value
        else:
            bad += 1
    if bad:
        logger.warning("--labels %s: %d row(s) without a finite %s skipped", file, bad, value_column)
    return labels


# --- scores on disk, shared by the processes ------------------------------------------------------------------------

def scores_folder(out: Path, key: str) -> Path:
    return out / "scores" / key


def read_scores(folder: Path) -> dict[str, float | None]:
    """Every score written so far by any process (a line cut off by a kill is ignored: that image is scored again)."""
    scores: dict[str, float | None] = {}
    for file in sorted(folder.glob("rank*.jsonl")):
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                scores[str(row["id"])] = row["score"]
            except (ValueError, KeyError, TypeError):
                continue
    return scores


def append_scores(folder: Path, rank: int, scores: dict[str, float | None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a", encoding="utf-8") as file:
        file.writelines(json.dumps({"id": image_id, "score": score}) + "\n" for image_id, score in scores.items())
        file.flush()


# --- pairs ------------------------------------------------------------------------------------------------------------

def make_pairs(scored: list[Scored], pairing: str, margin: float) -> tuple[list[tuple[Scored, Scored]], int]:
    """(chosen, rejected) pairs per prompt, and the number of prompts that gave none (every score within the margin)."""
    by_prompt: dict[str, list[Scored]] = {}
    for item in scored:
        by_prompt.setdefault(item.prompt_id, []).append(item)
    pairs, without = [], 0
    for items in by_prompt.values():
        ranked = sorted(items, key=lambda s: (-s.score, s.id))
        if pairing == "best-worst":
            found = [(ranked[0], ranked[-1])] if ranked[0].score - ranked[-1].score > margin else []
        else:
            found = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if a.score - b.score > margin]
        pairs += found
        without += not found
    return pairs, without


def top_samples(scored: list[Scored], top: int, min_score: float | None) -> list[Scored]:
    """Each prompt's `top` best-scored samples (at least `min_score`, when given)."""
    by_prompt: dict[str, list[Scored]] = {}
    for item in scored:
        by_prompt.setdefault(item.prompt_id, []).append(item)
    kept = []
    for items in by_prompt.values():
        best = sorted(items, key=lambda s: (-s.score, s.id))[:top]
        kept += [s for s in best if min_score is None or s.score >= min_score]
    return kept


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def wait_for(ids: set[str], folder: Path, poll: float = 2.0) -> dict[str, float | None]:
    """Rank 0: every image's score, once the other processes have written theirs (torchrun stops all processes if one
    fails, so this never waits on a dead one)."""
    while True:
        scores = read_scores(folder)
        if ids <= scores.keys():
            return scores
        time.sleep(poll)


def build_pairs(out: Path, samples: list, scores: dict[str, float | None], pairing: str, margin: float, top: int,
                min_score: float | None, skipped: Counter, extra: dict) -> dict:
    """pairs.jsonl, top.jsonl and summary.json from the scores (rank 0)."""
    from ..eval.generation import image_path

    scored = []
    for item in samples:
        value = scores.get(item.id)
        if value is None:
            continue
        path = image_path(out / IMAGES, item).relative_to(out).as_posix()
        scored.append(Scored(item.id, item.category, item.prompt, path, float(value)))
    pairs, without = make_pairs(scored, pairing, margin)
    write_jsonl(out / PAIRS, [{"chosen": c.path, "rejected": r.path, "text": c.prompt, "chosen_score": c.score,
                               "rejected_score": r.score, "prompt_id": c.prompt_id} for c, r in pairs])
    best = top_samples(scored, top, min_score)
    write_jsonl(out / TOP, [{"image": s.path, "text": s.prompt, "score": s.score, "prompt_id": s.prompt_id} for s in best])
    summary = {"prompts": len({s.category for s in samples}), "samples": len(samples), "scored": len(scored),
               "skipped": dict(skipped), "pairs": len(pairs), "prompts_without_a_pair": without, "top": len(best),
               "pairing": pairing, "margin": margin, **extra}
    with atomic_file(out / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def check_options(samples: int, pairing: str, margin: float, top: int) -> None:
    if samples < 2:
        raise UserError(f"--samples must be at least 2 (a pair needs two images of a prompt), got {samples}")
    if pairing not in PAIRINGS:
        raise UserError(f"--pairs must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if not math.isfinite(margin) or margin < 0:
        raise UserError(f"--margin must be a non-negative number, got {margin}")
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")


def parse_scorer_options(values: list[str]) -> dict:
    """`key=value` pairs for the scorer, values read as JSON where they parse (numbers, true/false) else strings."""
    options = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--scorer-option {value!r}: give key=value")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return options


def python_path_for_scorers() -> None:
    """`module:function` scorers in the working directory import as they would in `python -c` there."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
