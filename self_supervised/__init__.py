"""medssl.self_supervised."""
