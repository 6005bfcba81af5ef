"""The native CPU extension's C++ sources, installed as ``dynbatch_csrc`` so that a wheel carries them (they are
compiled against the installed torch on first use: ``dynbatch.ops.native``)."""
