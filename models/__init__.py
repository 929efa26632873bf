"""medssl.models."""
