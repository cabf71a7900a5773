"""The call-coverage probes (tests/call_coverage.py): a probed function records its first call, behaves
as before (closure, defaults, keyword-only arguments, signature) and is the original function afterwards."""

import functools
import inspect

import pytest

from tests import call_coverage


def make_function(offset):
    def scaled_sum(x, y=2, *, scale=10):
        return scale * (x + y) + offset  # reads a closure cell

    return scaled_sum


def test_a_probed_function_records_its_first_call_then_is_the_original_again():
    fn = make_function(offset=1)
    code, signature = fn.__code__, inspect.signature(fn)
    call_coverage.probe({fn: ["test.scaled_sum"]})
    try:
        assert fn.__code__ is not code and inspect.signature(fn) == signature
        assert "test.scaled_sum" not in call_coverage.called
        assert fn(3) == 51 and fn(3, 4, scale=2) == 15
        assert "test.scaled_sum" in call_coverage.called
        assert fn.__code__ is code and "__signature__" not in fn.__dict__
    finally:
        call_coverage.unprobe([fn])


def test_unprobe_restores_a_function_never_called():
    fn = make_function(offset=0)
    code = fn.__code__
    call_coverage.probe({fn: ["test.never"]})
    call_coverage.unprobe([fn])
    assert fn.__code__ is code and "__signature__" not in fn.__dict__
    assert "test.never" not in call_coverage.called and fn(1) == 30


def test_a_decorated_loss_is_watched_through_the_function_it_wraps():
    def decorator(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)

        del wrapper.__wrapped__  # as jaxkd.losses.core.per_example_loss does
        return wrapper

    @decorator
    def loss_a(x):
        return x

    @decorator
    def loss_b(x):
        return -x

    assert loss_a.__code__ is loss_b.__code__  # the wrapper's code says nothing about which loss ran
    assert call_coverage._own_function(loss_a).__code__ is not call_coverage._own_function(loss_b).__code__
    assert call_coverage._own_function(loss_b)(2) == -2


@pytest.mark.parametrize("name", ["losses.kd", "losses.next_token_targets", "methods.kd", "methods.taid"])
def test_the_public_losses_and_registered_factories_are_watched(name):
    names = {n for names in call_coverage.watched_functions().values() for n in names}
    assert name in names and "losses.log_softmax" in names and not any(n.startswith("batch.") for n in names)
