"""LLaVA-1.5's chat format: the text a question about an image is asked in."""

from __future__ import annotations

# The first turn: the image comes before the question.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# Turns after the first: the same without the image.
LATER_TURN_TEMPLATE = "USER: {question} ASSISTANT:"


def prompt(question: str) -> str:
    """The first turn asking ``question``, ending where the assistant's answer starts."""
    return PROMPT_TEMPLATE.format(question=question)
