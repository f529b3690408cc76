"""BTARD-SGD: training that survives Byzantine peers (verified butterfly CenteredClip, validators, bans).

``attacks``: what Byzantine peers send; ``simulation``: the protocol's aggregation, validation and bans with all
peers in one process (the experiment that compares aggregators under attack).
"""
