"""Secure model programs: the decoder and encoder forward passes composed from the protocols in
``protocols/``, the split of a plaintext checkpoint into owner / user / helper weight views, and
token-by-token generation. Use the submodules directly (``protocols.model.secure_decoder`` ...)."""
