"""The one tree assertion of the suite."""

import jax
import numpy as np


def assert_trees_close(actual, desired, rtol=1e-6, atol=0.0, *, normwise=False, err_msg=""):
    """``actual`` and ``desired`` have the same structure and every leaf pair is close.

    Leaves are compared as float64 (bfloat16 and int leaves included). With ``normwise`` the
    absolute tolerance of a leaf is ``rtol * max |desired|``: entries near zero are held to
    the leaf's scale, not to their own (for updates that cancel to rounding noise).
    """
    assert jax.tree.structure(actual) == jax.tree.structure(desired), err_msg
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        tol = rtol * max(float(np.abs(y).max(initial=0.0)), 1e-30) if normwise else atol
        np.testing.assert_allclose(x, y, rtol=rtol, atol=tol, err_msg=err_msg)
