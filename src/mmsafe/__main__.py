from mmsafe.cli import main

raise SystemExit(main())
