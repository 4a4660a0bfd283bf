"""The job file of ``swift-i2v batch`` (swift_model/batch/jobs.py): JSON Lines and CSV, defaults, and every
refusal naming ``file:line``."""

import json
import os

import numpy as np
import pytest

from swift_model.batch.jobs import JOB_FIELDS, read_jobs
from swift_model.generation.request import GenerationRequest

DEFAULTS = GenerationRequest(frames=9, width=128, height=64, prompt="default prompt", seed=5)


def _jsonl(path, *lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_jobs_take_defaults_and_their_own_fields(tmp_path):
    rng = np.random.default_rng()
    seeds = [int(s) for s in rng.integers(0, 2**31, 3)]
    f = _jsonl(tmp_path / "jobs.jsonl",
               {"id": "a", "image": "img/a.png", "seed": seeds[0]},
               "",  # blank lines are skipped, the line numbers stay the file's
               {"id": 17, "image": "/abs/b.png", "prompt": "own", "frames": 5, "guidance": 3.5, "neighbors": [1, 1],
                "joint": True, "seed": seeds[1]},
               {"id": "c-1.x_y", "image": "c.png", "prompt_embeds": "e.safetensors", "seed": seeds[2]})
    a, b, c = read_jobs(f, DEFAULTS)
    assert (a.id, a.line, b.id, b.line, c.id, c.line) == ("a", 1, "17", 3, "c-1.x_y", 4)
    assert a.image == str(tmp_path / "img" / "a.png") and b.image == "/abs/b.png"
    assert a.request == DEFAULTS.replace(seed=seeds[0])  # everything else from the defaults
    assert a.request.image is None and a.request.output is None
    assert (b.request.prompt, b.request.frames, b.request.guidance_scale, b.request.neighbors, b.request.joint) == \
        ("own", 5, 3.5, (1, 1), True)
    assert (b.request.width, b.request.height, b.request.seed) == (128, 64, seeds[1])
    assert c.request.prompt_embeds == str(tmp_path / "e.safetensors")  # relative to the job file's folder
    fields = c.fields()
    assert json.loads(json.dumps(fields)) == fields
    assert set(fields) == set(JOB_FIELDS) | {"line"} and fields["seed"] == seeds[2]


def test_a_jobs_prompt_replaces_default_embeddings(tmp_path):
    defaults = DEFAULTS.replace(prompt=None, prompt_embeds="default.safetensors")
    (job,) = read_jobs(_jsonl(tmp_path / "j.jsonl", {"id": "a", "image": "a.png", "prompt": "mine"}), defaults)
    assert job.request.prompt == "mine" and job.request.prompt_embeds is None


def test_csv_jobs_parse_cells(tmp_path):
    f = tmp_path / "jobs.csv"
    f.write_bytes(b'\xef\xbb\xbfid,image,seed,joint,prompt,guidance,neighbors\n'  # a spreadsheet's BOM
                  b'a,a.png,3,true,"hello, ""world""",,\n'
                  b'\n'
                  b'b,b.png,,no,"two\nlines",2.5,"0,1"\n'
                  b'c,c.png,4,,,,\n')
    a, b, c = read_jobs(f, DEFAULTS)
    assert (a.line, b.line, c.line) == (2, 4, 6)
    assert (a.request.seed, a.request.joint, a.request.prompt, a.request.guidance_scale) == \
        (3, True, 'hello, "world"', None)
    assert (b.request.seed, b.request.joint, b.request.prompt, b.request.guidance_scale, b.request.neighbors) == \
        (5, False, "two\nlines", 2.5, (0, 1))
    assert c.request == DEFAULTS.replace(seed=4) and c.image == str(tmp_path / "c.png")


@pytest.mark.parametrize("lines,where,needle", [
    ([{"id": "a", "image": "a.png", "sed": 1}], 1, "unknown field 'sed'"),
    ([{"id": "a", "image": "a.png"}, {"id": "b", "image": "b.png"}, {"id": "A", "image": "c.png"}], 3,
     "duplicate id 'A' (first on line 1)"),
    ([{"id": "a", "image": "a.png"}, '{"id": "b", "image": "b.png"'], 2, "not valid JSON"),
    ([{"id": "a", "image": "a.png"}, "[1, 2]"], 2, "must be a JSON object"),
    ([{"id": "../up", "image": "a.png"}], 1, "not a safe file name"),
    ([{"id": ".hidden", "image": "a.png"}], 1, "not a safe file name"),
    ([{"id": "a b", "image": "a.png"}], 1, "not a safe file name"),
    ([{"id": "a", "image": "a.png", "frames": 8}], 1, "4k+1"),
    ([{"id": "a", "image": "a.png", "width": 100}], 1, "multiples of"),
    ([{"id": "a", "image": "a.png", "seed": "3"}], 1, "seed"),
    ([{"id": "a", "image": "a.png", "guidance": -1}], 1, "guidance"),
    ([{"image": "a.png"}], 1, "no 'id'"),
    ([{"id": "a"}], 1, "no 'image'"),
    ([{"id": "a", "image": 3}], 1, "image must be a path"),
])
def test_jsonl_refusals_name_the_line(tmp_path, lines, where, needle):
    f = _jsonl(tmp_path / "jobs.jsonl", *lines)
    with pytest.raises(ValueError) as info:
        read_jobs(f, DEFAULTS)
    assert str(info.value).startswith(f"{f}:{where}: ") and needle in str(info.value), str(info.value)


@pytest.mark.parametrize("text,where,needle", [
    ("id,image,sed\na,a.png,1\n", 1, "unknown field 'sed'"),
    ("id,image,id\na,a.png,b\n", 1, "twice"),
    ("id,image\na,a.png\nb,b.png,extra\n", 3, "3 cells"),
    ("id,image,seed\na,a.png,x\n", 2, "seed must be an int"),
    ("id,image,joint\na,a.png,maybe\n", 2, "true or false"),
    ("id,image\na,a.png\n\nA,b.png\n", 4, "duplicate id"),
    ('id,image,prompt\na,a.png,"never closed\n', 2, "malformed CSV"),
])
def test_csv_refusals_name_the_line(tmp_path, text, where, needle):
    f = tmp_path / "jobs.csv"
    f.write_text(text)
    try:
        read_jobs(f, DEFAULTS)
    except ValueError as exc:
        assert str(exc).startswith(f"{f}:{where}: ") and needle in str(exc), str(exc)
    else:
        raise AssertionError("accepted")


def test_file_refusals(tmp_path):
    for name, content, needle in (("j.txt", "x", "must be .jsonl"), ("none.jsonl", None, "not found"),
                                  ("empty.jsonl", "\n\n", "no jobs"), ("bin.jsonl", b"\xff\xfe{", "not UTF-8")):
        f = tmp_path / name
        if isinstance(content, bytes):
            f.write_bytes(content)
        elif content is not None:
            f.write_text(content)
        with pytest.raises(ValueError, match=needle):
            read_jobs(f, DEFAULTS)
    with pytest.raises(TypeError, match="defaults"):
        read_jobs(tmp_path / "j.jsonl", {"frames": 9})
    assert os.listdir(tmp_path)  # nothing removed
