"""EditRequest validation: every bad field is named in the error."""

from __future__ import annotations

import pytest

from memedit import EditRequest, InvalidRequestError, Probe


def test_valid_request_round_trips() -> None:
    req = EditRequest(
        prompt="The place of death of Leo Arons is",
        target_new="Berlin",
        subject="Leo Arons",
        rephrase=["Where did Leo Arons die?"],
        locality=[Probe("The capital of France is", ("Paris",), "Relation_Specificity")],
    )
    assert req.fact == "The place of death of Leo Arons is Berlin"
    again = EditRequest.from_dict(req.to_dict())
    assert again == req


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "Who wrote Hamlet?", "target_new": ""}, "target_new"),
        ({"prompt": "Who wrote Hamlet?", "target_new": "   "}, "target_new"),
        ({"prompt": "Who wrote Hamlet?", "target_new": "X", "subject": "Macbeth"}, "subject"),
        ({"prompt": "", "target_new": "X"}, "prompt"),
        ({"prompt": "a" * 5000, "target_new": "X"}, "prompt"),
        ({"prompt": "bad \udcff text", "target_new": "X"}, "prompt"),
        ({"prompt": "Who?", "target_new": 3}, "target_new"),
    ],
)
def test_bad_fields_are_named(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        EditRequest(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field.split("[")[0] in str(info.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"target_new": "X"}, "prompt"),
        ({"prompt": "Who?", "target_new": "X", "colour": "red"}, "colour"),
        ({"prompt": "Who?", "target_new": "X", "locality": "nope"}, "locality"),
        ({"prompt": "Who?", "target_new": "X", "locality": [{"answers": ["a"]}]}, "locality[0]"),
        ([1, 2], "<request>"),
    ],
)
def test_malformed_records_are_named(data: object, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        EditRequest.from_dict(data)  # type: ignore[arg-type]
    assert info.value.field == field
