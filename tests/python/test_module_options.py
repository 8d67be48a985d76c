"""The Python modules accept and refuse the options of tests/shared/module_options.txt as the
table says; the C++ modules are held to the same table (tests/cpp/test_module_options.cpp), so
the two accept and refuse the same options."""

import math
import os

import pytest

import cnn_attention

TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared", "module_options.txt")
REQUIRED = {"ChannelAttention": {"channels": 16}, "SelfAttention": {"channels": 16}, "CBAM": {"channels": 16}}


def value_of(text):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def cases():
    found = []
    with open(TABLE) as table:
        for number, line in enumerate(table, 1):
            words = line.split("#")[0].split()
            if not words:
                continue
            module, *options, verdict = words
            assert verdict in ("yes", "no"), f"line {number}: {line!r}"
            found.append(pytest.param(module, dict(o.split("=", 1) for o in options), verdict == "yes", id=f"{number}"))
    return found


@pytest.mark.parametrize("module,options,accepted", cases())
def test_python_modules_accept_and_refuse_the_table(module, options, accepted):
    kwargs = dict(REQUIRED.get(module, {}))
    kwargs.update({name: value_of(text) for name, text in options.items()})
    cls = getattr(cnn_attention, module)
    if accepted:
        cls(**kwargs)
    else:
        with pytest.raises((ValueError, TypeError), match=r"^[A-Za-z]+: "):  # names the module
            cls(**kwargs)


def test_the_table_parses_its_values():
    assert value_of("3") == 3 and value_of("0.5") == 0.5 and value_of("topk") == "topk"
    assert math.isnan(value_of("nan")) and value_of("inf") == math.inf
