"""Which fastvid kernels a piece of code actually ran.

Every kernel-backed fastvid op asks ``fastvid._backend.resolve`` which implementation to run; a spy on
it tells a test whether a backend comparison compares a kernel with the reference at all (a model
made only of torch.nn layers gives the same numbers under every backend: comparing them proves nothing).
"""
import fastvid._backend as _backend


def spy_on_dispatch(monkeypatch) -> list:
    """From now on, every resolved backend name is appended to the returned list."""
    calls = []
    real = _backend.resolve

    def resolve(tensors):
        which = real(tensors)
        calls.append(which)
        return which

    monkeypatch.setattr(_backend, "resolve", resolve)
    return calls
