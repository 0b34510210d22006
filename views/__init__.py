"""The web UI: one module per tab (`build(state, ...)`), plot builders, per-session state.

Views gather inputs, call one `moe_core` function and show the result; no tensor maths here.
"""
