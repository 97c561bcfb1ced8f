fn main() -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let c = distlock::testing::TestCluster::from_env()?;
    println!("started in {:?}: {}", t.elapsed(), c.url());
    let m = distlock::LockManager::connect(c.url())?;
    let g = m.try_lock("a")?.expect("free");
    assert!(m.try_lock("a")?.is_none());
    let mut plain = postgres::Client::connect(c.url(), postgres::NoTls)?;
    let row = plain.query_one("select pg_try_advisory_lock($1)", &[&distlock::LockKey::name("a").as_id().unwrap()])?;
    println!("plain got it: {}", row.get::<_, bool>(0));
    drop(g);
    let row = plain.query_one("select pg_try_advisory_lock($1)", &[&distlock::LockKey::name("a").as_id().unwrap()])?;
    println!("plain got it after drop: {}", row.get::<_, bool>(0));
    let t = std::time::Instant::now();
    for i in 0..2000i64 { let g = m.try_lock(i)?.unwrap(); drop(g); }
    println!("2000 cycles {:?}", t.elapsed());
    let t = std::time::Instant::now();
    drop(c);
    println!("stopped in {:?}", t.elapsed());
    Ok(())
}
