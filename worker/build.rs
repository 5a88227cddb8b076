//! Embeds libtorch's library directory as the run path of every binary and test of this crate,
//! so `longhaul-worker` runs without `LD_LIBRARY_PATH` on the machine it was built on (the
//! container image installs the same torch wheel at the same path).

fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
