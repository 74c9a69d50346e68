//! Makes the `waypoint` binary (and this package's tests and benches) find libtorch without
//! `LD_LIBRARY_PATH`, and keeps `torch_cuda` linked so a CUDA box sees its GPU.
fn main() {
    waypoint_build_support();
}

fn waypoint_build_support() {
    // Set by torch-sys (`links = "tch"`) for its direct dependents.
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        // `--as-needed` would drop torch_cuda since no symbol of it is referenced directly, and
        // libtorch would then report no CUDA device.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
