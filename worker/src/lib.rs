//! `longhaul-worker`: agent, libtorch trainer and collectives. Filled by the worker issue (#5); empty until then.
