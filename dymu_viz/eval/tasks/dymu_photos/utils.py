"""doc_to_visual / doc_to_text / process_results of the ``dymu_photos`` task."""

import re

from dymu_viz.data import sample_photos


def doc_to_visual(doc: dict) -> list:
    return [sample_photos([doc["image"]])[doc["image"]]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict) -> str:
    return doc["question"] + lmms_eval_specific_kwargs[f"{doc['kind']}_prompt"]


def normalise(response: str) -> str:
    """The first word of a response, lower case, without punctuation ("B." -> "b", "Yes," -> "yes")."""
    words = re.findall(r"[a-z0-9]+", response.lower())
    return words[0] if words else ""


def process_results(doc: dict, results: list) -> dict:
    return {"accuracy": float(normalise(results[0]) == doc["answer"].lower())}
