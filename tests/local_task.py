"""A small lm-evaluation-harness task built from local text (no hub): which of four 8-word
continuations follows a WikiText-2 sentence's first 12 words (the real one, or one of three taken
from other sentences). Multiple choice, scored by the models' log-likelihoods, as ARC or
HellaSwag are."""

from __future__ import annotations

import json
import random
from pathlib import Path

from admmq_dist.evaluate import EVALUATION_TEXT

NAME = "local_cloze"


def write_local_task(folder: Path, docs: int = 40, seed: int = 0) -> Path:
    """``folder`` with ``local_cloze.yaml`` and its data file; returns ``folder``."""
    sentences = [s.split() for line in EVALUATION_TEXT.read_text().splitlines()
                 for s in line.split(" . ") if len(s.split()) >= 20 and "=" not in s]
    rng = random.Random(seed)
    picked = rng.sample(sentences, docs)
    rows = []
    for i, words in enumerate(picked):
        others = [picked[j][12:20] for j in rng.sample([j for j in range(docs) if j != i], 3)]
        label = rng.randrange(4)
        choices = [" ".join(o) for o in others]
        choices.insert(label, " ".join(words[12:20]))
        rows.append({"context": " ".join(words[:12]), "choices": choices,
                     "label": label})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{NAME}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{NAME}.yaml").write_text(f"""task: {NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder
