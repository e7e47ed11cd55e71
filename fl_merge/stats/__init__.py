"""Statistics and figures: confidence intervals (`intervals`), heterogeneity metrics over task
vectors (`heterogeneity`), which measure predicts a loss across runs (`predictors`), what `fl-merge report` ranks (`selection`) and the figures of a
run or a sweep (`report`).

May import: fl_merge.core, fl_merge.merging, fl_merge.io.
"""
