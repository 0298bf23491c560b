"""The benchmark harness: the paper's Tables 1 and 2, Figs. 2 and 4, and the perf runner.

Each runner reads stores through :mod:`credanno.stores`, evaluates through
:mod:`credanno.eval`, and states the data it ran on (:mod:`credanno.viz.source`).
"""

from credanno.bench.fig2 import Fig2Result, fig2_from_table1
from credanno.bench.fig4 import FIG4_FRACS, Fig4Result, run_fig4
from credanno.bench.paper import n_correct_distribution, paper_fig2, paper_table1, paper_table2
from credanno.bench.perf import machine_description, perf_markdown, run_perf
from credanno.bench.table1 import TABLE1_CONFIGS, Table1Config, Table1Result, run_table1
from credanno.bench.table2 import TABLE2_ROWS, Table2Result, run_table2

__all__ = [
    "FIG4_FRACS", "TABLE1_CONFIGS", "TABLE2_ROWS", "Fig2Result", "Fig4Result", "Table1Config",
    "Table1Result", "Table2Result", "fig2_from_table1", "machine_description",
    "n_correct_distribution", "paper_fig2", "paper_table1", "paper_table2", "perf_markdown",
    "run_fig4", "run_perf", "run_table1", "run_table2",
]
