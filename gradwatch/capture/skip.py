"""A skipped update skips every write of the step, not only the update's.

gradwatch skips a non-finite step with a `tf.cond` around the optimizer's
update (`_distributed_tf_update_step`), where the step's verdict is known.
Keras writes some of the optimizer's state earlier, before the gradient
reaches gradwatch, so a `tf.cond` there alone would let them through on a
"skipped" step:

- Nadam advances its `_u_product` in its `_backend_update_step`, before the
  update (through `optimizer.assign`);
- decoupled weight decay (AdamW's `weight_decay`) is applied by
  `_apply_weight_decay` before the gradient is even all-reduced.

On one device both are held back until the update and made inside the same
`tf.cond` (`DeferredWrites`, and the capture's `_on_weight_decay`): their
values are the ones Keras computed, in Keras' order (the decay, the held
writes, the update), and nothing reads those variables in between, so a step
that is not skipped is bit for bit Keras' own (`tests/test_skip.py`, every
Keras optimizer). Under a distribution strategy they are not held back
(documented limitation: Keras makes them in replica context).
"""


class DeferredWrites:
    """Writes an optimizer makes through `assign`, `assign_add` and
    `assign_sub` while held (`hold`), kept instead of made, and made later
    (`replay`) through the optimizer's own methods.

    >>> class Optimizer:
    ...     def assign(self, variable, value):
    ...         variable.append(value)
    >>> optimizer, variable = Optimizer(), []
    >>> held = DeferredWrites(optimizer)
    >>> held.hold(); optimizer.assign(variable, 1.0); writes = held.release()
    >>> variable, len(writes)
    ([], 1)
    >>> held.replay(writes); variable
    [1.0]
    """

    NAMES = ("assign", "assign_add", "assign_sub")

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.writes = []

    def hold(self):
        def holder(name):
            return lambda variable, value: self.writes.append((name, variable, value))
        for name in self.NAMES:
            self.optimizer.__dict__[name] = holder(name)

    def release(self):
        """Stops holding (the optimizer's own methods are back); the held writes."""
        for name in self.NAMES:
            self.optimizer.__dict__.pop(name, None)
        writes, self.writes = self.writes, []
        return writes

    def replay(self, writes):
        """Makes the held writes, in their order."""
        for name, variable, value in writes:
            getattr(self.optimizer, name)(variable, value)
