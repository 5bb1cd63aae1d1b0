"""Malformed event files (``out/events/*.json``) with the text each one's 400 message must hold."""

from __future__ import annotations


def pairs(**kv: str) -> list[dict]:
    """``kv`` as a KeyValuePairs array (JSON-able), in argument order."""
    return [{"key": k, "value": v} for k, v in kv.items()]


# (case, file content: JSON-able or raw text, what the message says)
BAD_EVENTS = [
    ("malformed JSON", '[{"key": "eventType", "value": ', "malformed JSON"),
    ("not a list", {"eventType": "file_discovered"}, "got dict"),
    ("not pairs", [["eventType", "file_discovered"]], "item 0"),
    ("number value", [{"key": "eventType", "value": "file_discovered"}, {"key": "n", "value": 3}], "item 1 (key 'n')"),
    ("missing value", [{"key": "eventType"}], "field 'value'"),
    ("missing eventType", pairs(files="b.bin"), "key 'eventType': required key is missing"),
    ("invalid eventType", pairs(eventType="cat_found"), "key 'eventType': event type 'cat_found'"),
    ("missing file", pairs(eventType="file_discovered", files="nope.txt"), "key 'files': 'nope.txt' is not a file"),
    ("dotdot", pairs(eventType="file_discovered", files="../meta.json"), "'../meta.json' escapes out/data"),
    ("absolute", pairs(eventType="file_discovered", files="/etc/passwd"), "'/etc/passwd' is an absolute path"),
    ("directory", pairs(eventType="file_discovered", files="sub"), "'sub' is not a file"),
    ("empty", "", "the file is empty"),
    ("blank", "  \n", "the file is empty"),
    ("too large", pairs(eventType="file_discovered", pad="x" * 2000), "over the limit of 1024 bytes"),
    ("duplicate eventType", pairs(eventType="file_discovered") + pairs(eventType="face_detected"), "appears more than once"),
    # A name given twice in one item: JSON readers keep one of the values in silence.
    ("duplicate value in an item", '[{"key": "eventType", "value": "file_discovered"}, {"key": "k", "value": "1", '
                                   '"value": "2"}]', 'item 1: "value" is given 2 times ("1", "2")'),
    ("duplicate key in an item", '[{"key": "colour", "key": "eventType", "value": "file_discovered"}]',
     'item 0: "key" is given 2 times ("colour", "eventType")'),
]
