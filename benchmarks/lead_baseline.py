"""ROUGE of the lead baseline (a document's first sentence) on a JSONL split, scored as llmkit scores.

Usage: python benchmarks/lead_baseline.py ../shared/data/scitldr/validation.jsonl [document] [all_summaries]
"""

import json
import sys

from llmkit.metrics import rouge_scores
from llmkit.tasks.summarization import lead_sentence


def main() -> None:
    path = sys.argv[1]
    doc_col = sys.argv[2] if len(sys.argv) > 2 else "document"
    ref_col = sys.argv[3] if len(sys.argv) > 3 else "all_summaries"
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    preds = [lead_sentence(r[doc_col]) for r in rows]
    refs = [r[ref_col] if isinstance(r[ref_col], list) else [r[ref_col]] for r in rows]
    scores = rouge_scores(preds, refs)
    print(json.dumps({"rows": len(rows), **{k: round(v, 2) for k, v in scores.items()}}))


if __name__ == "__main__":
    main()
