"""The run layer every entry script shares: config schema, results folder, weights, trainer."""
