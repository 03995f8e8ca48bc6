"""What turns the ``[SEG]`` embedding into a mask: the proposal scorer (with its optional
mask-geometry embedding), the losses that train it, and the selection of proposals."""
