"""medssl.downstream."""
