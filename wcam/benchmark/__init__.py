"""``wcam bench``: Winsor-CAM against the floor (bare forward + activation gradients) and against the peer
libraries, timed side by side in one run. ``cases`` builds what is timed, ``peers`` wraps the other
libraries, ``timing`` interleaves the rounds, ``report`` prints the table and writes the JSON."""

from wcam.benchmark.floor import floor

__all__ = ["floor"]
