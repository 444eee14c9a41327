use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::quant::{Format, Threads};
use lfm2_audio::session::Session;
use lfm2_audio::weights::QuantPlan;
use std::sync::Arc;
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let plan = match args[2].as_str() {
        "q4" => QuantPlan::with_format(Format::Q4_0, Arc::new(Threads::all_cores().unwrap())),
        "q8" => QuantPlan::with_format(Format::Q8_0, Arc::new(Threads::all_cores().unwrap())),
        _ => QuantPlan::f32(),
    };
    let t = Instant::now();
    let m = Lfm2AudioModel::load_with(std::path::Path::new(&args[1]), plan).unwrap();
    println!(
        "load {:.1}s, backbone {:.0} MB",
        t.elapsed().as_secs_f64(),
        m.backbone.weight_bytes() as f64 / 1e6
    );
    let mut s = Session::new(m.backbone.clone()).unwrap();
    let ids: Vec<u32> = (0..64).map(|i| 1000 + i).collect();
    let t = Instant::now();
    s.prefill_text(&ids).unwrap();
    println!("prefill 64: {:.1} tok/s", 64.0 / t.elapsed().as_secs_f64());
    let mut times = vec![];
    for i in 0..20 {
        let t = Instant::now();
        let h = s.step_text(500 + i).unwrap();
        let _ = m.backbone.text_logits(&h.unsqueeze(0).unwrap()).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "text step median {:.1} ms = {:.1} tok/s",
        times[10] * 1e3,
        1.0 / times[10]
    );
}
