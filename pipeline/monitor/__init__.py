"""`rlhf monitor DB`: watch a served policy through its traffic log (feedback/traffic.py, written by
`rlhf serve policy --monitor DB`): score the recorded answers, summarise them per window, test them for drift
against the evaluate stage's answers, look for reward hacking, and write OUT_DIR/monitor.json and monitor.html.

    rlhf monitor traffic.db --reward-model runs/tiny/reward --rule feedback.synthetic:rule_score \
        --baseline runs/tiny/evaluate --window 200 -o runs/tiny/monitor

    scoring.py   the scorers (reward model, rule, judge) and the score store that makes a second run score only new rows
    baseline.py  the evaluate artifact's answers of the served policy
    stats.py     quantiles, two-sample Kolmogorov-Smirnov, z-tests of a mean or a rate
    summary.py   windows, their statistics, drift, the hacking signal, the alerts
    plots.py     the charts over time; page.py the HTML page; run.py one run, end to end

This package imports nothing on import (run.py pulls in the page, which pulls in the report): import the module
you need. docs/monitor.md has the formulas and thresholds.
"""
