"""doc_to_visual / doc_to_text / process_results of the ``dymu_photos`` task."""

import re

from dymu_viz.data import sample_photos


def doc_to_visual(doc: dict) -> list:
    return [sample_photos([doc["image"]])[doc["image"]]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict) -> str:
    return doc["question"] + lmms_eval_specific_kwargs[f"{doc['kind']}_prompt"]


def normalise(response: str) -> str:
    """The first word of a response, lower case, without punctuation ("Yes," -> "yes")."""
    words = re.findall(r"[a-z0-9]+", response.lower())
    return words[0] if words else ""


# An option letter alone ("B", "b.", " (B) "), or marked at the start of a longer answer
# ("B. an astronaut", "(b) an astronaut", "B) ..."); a bare first word such as the article in "a
# cat is shown" is not a choice.
ALONE = re.compile(r"\s*\(?([a-z])\)?[.:)]?\s*", re.IGNORECASE)
MARKED = re.compile(r"\s*(?:\(([a-z])\)|([a-z])[.)])\s", re.IGNORECASE)


def chosen_option(response: str) -> str:
    """The option letter a multiple-choice response gives, upper case, or "" when it gives none."""
    found = ALONE.fullmatch(response) or MARKED.match(response)
    return next((g for g in found.groups() if g), "").upper() if found else ""


def process_results(doc: dict, results: list) -> dict:
    response = results[0]
    if doc["kind"] == "choice":
        return {"accuracy": float(chosen_option(response) == doc["answer"].upper())}
    return {"accuracy": float(normalise(response) == doc["answer"].lower())}
