//! Embeds libtorch's library directory as the run path of every binary and test of this crate,
//! so `longhaul-worker` runs without `LD_LIBRARY_PATH` on the machine it was built on (the
//! container image installs the same torch wheel at the same path).

fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // The torch wheel's version (`torch/version.py` beside `torch/lib`), for `check`.
        let version_py = std::path::Path::new(&dir).join("..").join("version.py");
        if let Ok(text) = std::fs::read_to_string(&version_py) {
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_owned());
            if let Some(v) = version {
                println!("cargo:rustc-env=LONGHAUL_LIBTORCH_VERSION={v}");
            }
            println!("cargo:rerun-if-changed={}", version_py.display());
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
